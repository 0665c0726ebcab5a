"""The MLflow model registry side of the platform: the audited classifiers, the searches' generators,
the champion, and the re-audit of registered classifiers.

    names        registered model names (tldr-classifier-/tldr-generator-<dataset>), models:/ URIs, RegistryError
    models       a checkpoint logged as a pyfunc model; a classifier registered; a version loaded weights-only
    pyfunc       the MLflow pyfunc flavour of tldr models (the `loader_module` of every logged model)
    champion     the champion rule, decided and set under a lock
    promotion    a search's best generator registered, and made champion when it beats the champion
    cli          `tldr registry promote|show`
    audits/      the re-audit of registered classifiers: a full audit per version, the comparison with the
                 version it would replace, the promotion gate, the history charts (its __init__ maps it)
"""


def _load_pyfunc(data_path: str):
    """The loader of models logged while `tldr_core.platform.registry` (then a module) was their
    `loader_module`; models name `pyfunc` now."""
    from tldr_core.platform.registry.pyfunc import _load_pyfunc as load

    return load(data_path)
