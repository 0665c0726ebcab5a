"""The MLflow model registry side of a search: the audited classifier, the generators, the champion.

    python -m tldr_core.platform.registry promote --search-run RUN_ID      (promotion for an existing search)
    python -m tldr_core.platform.registry show --dataset mnist-bundled      (versions, tags and the champion)

Models are logged as MLflow pyfunc models whose only data is a tldr weights-only checkpoint
(`tldr_core.attack.checkpoints`): loading one, through `mlflow.pyfunc.load_model` (the flavour is
`tldr_core.platform.pyfunc`) or through the helpers here, never unpickles code (`load_classifier` /
`load_generator` use `torch.load(weights_only=True)`). A registered generator samples with the same
`generate` the search scored, so it reproduces the scored reconstructions for the same seed.

Registered names: `tldr-classifier-<dataset>` (tags: sha256 of the checkpoint, test_accuracy, ...),
`tldr-generator-<dataset>` (tags: the classifier version it attacks, objective, objective_value,
search_run, trial_run, label_agreement). A generator version gets the alias `champion` only if it
beats the current champion for the same classifier on the same objective, and never from a newer
version for another classifier or objective; the alias is decided and set under a lock against the
store's state at that moment (`tldr_core.platform.champion`), so re-promoting an older search never
moves it back and concurrent promotions end on the better version.

Only TLDR searches promote: a KKT search (`--attack kkt`, tag `tldr.attack=kkt`) produces candidate
images, not a sampler, so it registers nothing (its best trial's `kkt.pt` stays a run artifact);
`promote` says so and tags the search run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform import tracking as tr
from tldr_core.platform.champion import (CHAMPION, PromotionLockError, champion_decision,  # noqa: F401
                                         claim_champion)
# _load_pyfunc: also the loader of models logged while this module was their `loader_module`
from tldr_core.platform.pyfunc import LOADER_MODULE, _load_pyfunc  # noqa: F401
from tldr_core.platform.trial_runs import TrialSummary, best_trial, summarize_trials
from tldr_core.platform.uris import UriError, normalize_tracking_uri

CLASSIFIER_MODEL = "tldr-classifier-{dataset}"
GENERATOR_MODEL = "tldr-generator-{dataset}"


class RegistryError(RuntimeError):
    """A registry URI or version that cannot be used."""


def classifier_model_name(dataset: str) -> str:
    return CLASSIFIER_MODEL.format(dataset=dataset)


def generator_model_name(dataset: str) -> str:
    return GENERATOR_MODEL.format(dataset=dataset)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_requirements() -> list[str]:
    """What loading a logged model needs besides its own code (logged with it, `code_paths`): the
    versions running here, so a fresh environment built from requirements.txt matches."""
    import mlflow
    import numpy
    import torch
    import yaml

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}", f"pyyaml=={yaml.__version__}"]


def package_dir() -> str:
    """The imported tldr_core package folder: logged beside every model (`code_paths`), so
    `mlflow.pyfunc.load_model` imports the loader from the model itself, not from an installed copy."""
    import tldr_core

    return str(Path(list(tldr_core.__path__)[0]).resolve())


def log_checkpoint_model(c, run_id: str, checkpoint: str | Path, name: str) -> Any:
    """Log a tldr checkpoint as a pyfunc model of `run_id` (under `name`), with a signature, an input
    example, the tldr_core code and pinned requirements; returns MLflow's ModelInfo.

    The logged model is created in the run's own experiment (`initialize_logged_model`), whether or not
    the run is MLflow's active run (without this, MLflow 3 puts it in experiment 0)."""
    import mlflow
    from mlflow.models import Model

    from tldr_core.attack.checkpoints import CheckpointError
    from tldr_core.platform.pyfunc import CheckpointPyfunc, signature_and_example

    mlflow.set_tracking_uri(c.tracking_uri)
    run = tr.retry(lambda: c.get_run(run_id))
    try:
        signature, example = signature_and_example(CheckpointPyfunc(checkpoint))
    except CheckpointError:  # logged as it is: loading it refuses it the same way, with this message
        signature, example = None, None
    logged = tr.retry(lambda: mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
        params={k: v[:6000] for k, v in run.data.params.items()}))
    return tr.retry(lambda: Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                                      model_id=logged.model_id, loader_module=LOADER_MODULE,
                                      data_path=str(checkpoint), code_paths=[package_dir()],
                                      pip_requirements=pip_requirements(), signature=signature,
                                      input_example=example), what="log model")


def _ensure_registered_model(c, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tr.retry(lambda: c.get_registered_model(name))
    except MlflowException:
        try:
            c.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created concurrently


def _versions(c, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(tr.retry(lambda: c.search_model_versions(f"name = '{name}'")))
    except MlflowException:
        return []


def _alias_version(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# ------------------------------------------------------------------------------ classifier

@dataclass
class ClassifierRef:
    name: str
    version: str
    sha256: str
    test_accuracy: float | None
    reused: bool = False

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_classifier(c, run_id: str, checkpoint: str | Path, dataset: str, meta: dict[str, Any]) -> ClassifierRef:
    """Register the audited classifier (logged in `run_id`), or reuse the version holding the same file."""
    name = classifier_model_name(dataset)
    sha = sha256_file(checkpoint)
    acc = meta.get("test_accuracy")
    for mv in _versions(c, name):
        if mv.tags.get("sha256") == sha:
            return ClassifierRef(name, str(mv.version), sha, float(mv.tags["test_accuracy"])
                                 if "test_accuracy" in mv.tags else acc, reused=True)
    info = log_checkpoint_model(c, run_id, checkpoint, "classifier")
    _ensure_registered_model(c, name, f"Classifier under audit on {dataset} (tldr weights-only checkpoint).")
    tags = {"sha256": sha, "dataset": dataset, "format": "tldr-classifier/1"}
    for k in ("test_accuracy", "train_accuracy", "train_size", "test_size", "cache_key"):
        if meta.get(k) is not None:
            tags[k] = str(meta[k])
    if isinstance(meta.get("settings"), dict):
        tags["settings"] = json.dumps(meta["settings"], sort_keys=True)
    mv = tr.retry(lambda: c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                                 model_id=getattr(info, "model_id", None),
                                                 description=f"test accuracy {acc}"))
    return ClassifierRef(name, str(mv.version), sha, acc)


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


def resolve_version(c, uri: str):
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_models_uri(uri)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: no such registered model version ({str(exc).splitlines()[0][:200]})") from None


def download_checkpoint(c, uri: str, dst: str | Path | None = None) -> tuple[Path, Any]:
    """The tldr checkpoint file behind a registry URI (downloaded), and its ModelVersion."""
    import mlflow

    mv = resolve_version(c, uri)
    mlflow.set_tracking_uri(c.tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="tldr-model-"))
    local = Path(tr.retry(lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst))))
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise RegistryError(f"{uri}: the model holds no tldr checkpoint (.pt) file")
    return found[0], mv


def load_registered_classifier(c, uri: str, dst: str | Path | None = None):
    """(classifier, meta, ClassifierRef, local path) for models:/tldr-classifier-...@alias; weights-only load."""
    from tldr_core.attack.checkpoints import load_classifier

    path, mv = download_checkpoint(c, uri, dst)
    model, meta = load_classifier(path)
    sha = sha256_file(path)
    acc = mv.tags.get("test_accuracy")
    return model, meta, ClassifierRef(mv.name, str(mv.version), sha, float(acc) if acc else meta.get("test_accuracy"),
                                      reused=True), path


def load_registered_generator(c, uri: str, dst: str | Path | None = None):
    """(generator, meta, ModelVersion) for models:/tldr-generator-<dataset>@champion; weights-only load."""
    from tldr_core.attack.checkpoints import load_generator

    path, mv = download_checkpoint(c, uri, dst)
    gen, meta = load_generator(path)
    return gen, meta, mv


# ------------------------------------------------------------------------------ promotion

@dataclass
class PromotionResult:
    name: str | None
    version: str | None
    promoted: bool
    reason: str
    value: float | None = None
    champion_version: str | None = None  # the version holding the alias after the promotion


def _search_context(c, search_run_id: str) -> tuple[str, str, str, dict[str, str]]:
    """(experiment id, objective, dataset, classifier tags) of a search run; RegistryError when it is not one."""
    run = tr.retry(lambda: c.get_run(search_run_id))
    t = run.data.tags
    if t.get(tr.ROLE) != "search":
        raise RegistryError(f"run {search_run_id} is not a search run (tag {tr.ROLE}={t.get(tr.ROLE)!r})")
    objective, dataset = t.get(tr.OBJECTIVE), t.get("tldr.dataset")
    if not objective or not dataset:
        raise RegistryError(f"search run {search_run_id} lacks its objective/dataset tags")
    clf = {k: t.get(f"tldr.{k}", "") for k in ("classifier_name", "classifier_version", "classifier_sha256")}
    return run.info.experiment_id, objective, dataset, clf


def _version_of(c, name: str, versions: list, best: TrialSummary, search_run_id: str, objective: str,
                dataset: str, clf: dict[str, str], log: Callable[[str], None]):
    """The generator version holding the best trial's model: the existing one, or a new one."""
    mine = [v for v in versions if v.run_id == best.run_id]
    if mine:
        log(f"registry: {name} version {mine[0].version} already holds trial run {best.run_id}")
        return mine[0]
    best_run = tr.retry(lambda: c.get_run(best.run_id))
    source = best_run.data.tags.get(tr.GENERATOR_MODEL)
    if not source:
        raise RegistryError(f"trial run {best.run_id} has no logged generator model (tag {tr.GENERATOR_MODEL})")
    tags = {**clf, "objective": objective, "objective_value": repr(best.value), "dataset": dataset,
            "search_run": search_run_id, "trial_run": best.run_id, "trial_id": best.trial_id,
            "label_agreement": "" if best.label_agreement is None else repr(best.label_agreement),
            "variant": best.params.get("variant", "")}
    mv = tr.retry(lambda: c.create_model_version(
        name, source=source, run_id=best.run_id, tags=tags, model_id=best_run.data.tags.get(tr.GENERATOR_MODEL_ID) or None,
        description=f"search {search_run_id}, trial {best.trial_id}: {objective} {best.value:.4f}"))
    versions.append(mv)
    return mv


def promote(c, search_run_id: str, log: Callable[[str], None] | None = print) -> PromotionResult:
    """Register the best finished trial's generator of a search; alias it `champion` only if it beats the
    comparable champion (same classifier checkpoint, same objective). Idempotent for a search."""
    log = log or (lambda s: None)
    experiment_id, objective, dataset, clf = _search_context(c, search_run_id)
    best = best_trial(summarize_trials(c, experiment_id, search_run_id, objective))
    attack = tr.retry(lambda: c.get_run(search_run_id)).data.tags.get(tr.ATTACK, "tldr")
    if attack != "tldr":
        return _not_registered(c, search_run_id, attack, best, objective, log)
    if best is None:
        res = PromotionResult(None, None, False, "nothing to promote: no trial of this search finished")
        tr.set_tags(c, search_run_id, {"tldr.promotion": res.reason})
        log(f"promotion: {res.reason}")
        return res
    name = generator_model_name(dataset)
    _ensure_registered_model(c, name, f"TLDR generators attacking the {dataset} classifier; alias `champion`: "
                                      "the best one for the latest audited classifier (see tldr_core/platform/registry.py).")
    versions = _versions(c, name)
    version = str(_version_of(c, name, versions, best, search_run_id, objective, dataset, clf, log).version)
    # decided against the store's state when the alias is set, not the versions listed above
    promoted, reason, holder = claim_champion(c, name, version, best.value, clf, objective)
    tr.retry(lambda: c.set_model_version_tag(name, version, "promotion", reason))
    tr.set_tags(c, search_run_id, {"tldr.promotion": reason, "tldr.generator_model": name,
                                   "tldr.generator_version": version, "tldr.champion": str(promoted).lower()})
    log(f"promotion: {reason}")
    return PromotionResult(name, version, promoted, reason, best.value, holder)


def _not_registered(c, search_run_id: str, attack: str, best: TrialSummary | None, objective: str,
                    log: Callable[[str], None]) -> PromotionResult:
    """The promotion of a non-TLDR search: nothing registered (the registry holds generators); says where
    its best result is instead."""
    where = (f"; its best trial {best.number} ({objective} {best.value:.4f}) keeps its candidates as the run "
             f"artifact kkt.pt of run {best.run_id}" if best is not None else "; no trial of it finished")
    reason = f"nothing registered: a {attack} search has no generator to register{where}"
    tr.set_tags(c, search_run_id, {"tldr.promotion": reason, "tldr.champion": "false"})
    log(f"promotion: {reason}")
    return PromotionResult(None, None, False, reason, best.value if best is not None else None)


# ------------------------------------------------------------------------------ CLI

def _show(c, dataset: str) -> int:
    for name in (classifier_model_name(dataset), generator_model_name(dataset)):
        versions = sorted(_versions(c, name), key=lambda v: int(v.version))
        if not versions:
            print(f"{name}: no versions")
            continue
        holder = _alias_version(c, name, CHAMPION)
        print(f"{name}:")
        for v in versions:
            mark = f"  @{CHAMPION}" if holder is not None and holder.version == v.version else ""
            keys = ("test_accuracy", "sha256") if "classifier" in name else \
                ("objective", "objective_value", "classifier_version", "search_run")
            info = ", ".join(f"{k}={v.tags.get(k, '')[:16] if k == 'sha256' else v.tags.get(k, '')}" for k in keys)
            print(f"  version {v.version}{mark}: {info}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`promote` and `show`; --tracking-uri before or after the subcommand."""
    from tldr_core.platform import cli_flags as flags

    p = flags.parser("python -m tldr_core.platform.registry", __doc__)
    flags.add_tracking_uri(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("promote", help="register a search's best generator; alias champion if it beats the champion",
                        formatter_class=flags.HelpFormatter)
    pr.add_argument("--search-run", required=True, help="run id of the search (parent) run")
    sh = sub.add_parser("show", help="list registered classifier/generator versions of a data set",
                        formatter_class=flags.HelpFormatter)
    sh.add_argument("--dataset", required=True)
    for sp in (pr, sh):  # also accepted after the subcommand (`show --tracking-uri X`); SUPPRESS keeps one given before
        flags.add_tracking_uri(sp, default=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    from tldr_core.platform import cli_flags as flags

    args = build_parser().parse_args(argv)
    try:
        uri = normalize_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        tr.check_tracking_uri(uri)
        c = tr.client(uri)
        if args.cmd == "show":
            return _show(c, args.dataset)
        res = promote(c, args.search_run)
    except (RegistryError, tr.TrackingError, PromotionLockError, UriError) as exc:
        return flags.print_error(exc)
    except Exception as exc:  # noqa: BLE001 - MlflowException for an unknown run id etc.
        if type(exc).__name__ == "MlflowException":
            return flags.print_error(exc)
        raise
    if res.version:
        print(f"{res.name} version {res.version}: {'champion' if res.promoted else 'not promoted'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
