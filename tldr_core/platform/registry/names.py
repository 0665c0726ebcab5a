"""The names and URIs of registered models, and the registry's error: `tldr-classifier-<dataset>` (the
audited classifiers), `tldr-generator-<dataset>` (the searches' generators), `models:/name/version`
and `models:/name@alias` (the alias `champion` is `champion`'s)."""
from __future__ import annotations

CLASSIFIER_MODEL = "tldr-classifier-{dataset}"
GENERATOR_MODEL = "tldr-generator-{dataset}"


class RegistryError(RuntimeError):
    """A registry URI or version that cannot be used."""


def classifier_model_name(dataset: str) -> str:
    return CLASSIFIER_MODEL.format(dataset=dataset)


def generator_model_name(dataset: str) -> str:
    return GENERATOR_MODEL.format(dataset=dataset)


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias or models:/name/version -> (name, version, alias)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r} is not a registry URI (models:/name@alias or models:/name/version)")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"{uri!r} is not a registry URI (models:/name@alias or models:/name/version)")
