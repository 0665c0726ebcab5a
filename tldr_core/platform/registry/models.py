"""Registered tldr models in MLflow: a checkpoint logged as a pyfunc model, the audited classifier
registered (or its version reused), and a registered version downloaded and loaded weights-only.

Models are logged as MLflow pyfunc models whose only data is a tldr weights-only checkpoint
(`tldr_core.attack.checkpoints`): loading one, through `mlflow.pyfunc.load_model` (the flavour is
`pyfunc`) or through the helpers here, never unpickles code (`load_classifier` / `load_generator`
use `torch.load(weights_only=True)`). A registered generator samples with the same `generate` the
search scored, so it reproduces the scored reconstructions for the same seed.

Registered names (`names`): `tldr-classifier-<dataset>` (tags: sha256 of the checkpoint,
test_accuracy, ...), `tldr-generator-<dataset>` (registered by `promotion`).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tldr_core.platform.registry.names import RegistryError, classifier_model_name, parse_models_uri
from tldr_core.platform.registry.pyfunc import LOADER_MODULE
from tldr_core.platform.tracking import store as tr


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_requirements() -> list[str]:
    """What loading a logged model needs besides its own code (logged with it, `code_paths`): the
    versions running here, so a fresh environment built from requirements.txt matches. mlflow-skinny
    (with pandas, which mlflow.pyfunc imports) rather than mlflow: loading needs no tracking server, UI or
    database, and the full package pulled in Flask, SQLAlchemy, scikit-learn and more (27 of the 55 s a
    fresh install took here)."""
    import mlflow
    import numpy
    import pandas
    import torch
    import yaml

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow-skinny=={mlflow.__version__}",
            f"pandas=={pandas.__version__}", f"numpy=={numpy.__version__}", f"pyyaml=={yaml.__version__}"]


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
    from tldr_core.platform.registry.pyfunc import CheckpointPyfunc, signature_and_example

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


def ensure_registered_model(c, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tr.retry(lambda: c.get_registered_model(name))
    except MlflowException:
        try:
            c.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created concurrently


def model_versions(c, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(tr.retry(lambda: c.search_model_versions(f"name = '{name}'")))
    except MlflowException:
        return []


def alias_version(c, name: str, alias: str):
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


def _same_file(c, name: str, sha: str, acc: float | None) -> ClassifierRef | None:
    """The oldest version of ``name`` holding the file ``sha``, or None."""
    same = sorted((mv for mv in model_versions(c, name) if mv.tags.get("sha256") == sha), key=lambda mv: int(mv.version))
    if not same:
        return None
    mv = same[0]
    return ClassifierRef(name, str(mv.version), sha, float(mv.tags["test_accuracy"]) if "test_accuracy" in mv.tags
                         else acc, reused=True)


def register_classifier(c, run_id: str, checkpoint: str | Path, dataset: str, meta: dict[str, Any]) -> ClassifierRef:
    """Register the audited classifier (logged in `run_id`), or reuse the version holding the same file.

    Idempotent under concurrency: on a local store the look-up and the registration happen under the
    store's registry lock (two searches started together register one version); a remote store has no
    shared lock, so after registering, a version of the same file registered first wins and ours is
    deleted (both racers then name the oldest)."""
    from tldr_core.platform.registry.champion import promotion_lock

    name = classifier_model_name(dataset)
    sha = sha256_file(checkpoint)
    with promotion_lock(c.tracking_uri):
        ref = _same_file(c, name, sha, meta.get("test_accuracy")) or _register(c, run_id, checkpoint, name, sha,
                                                                              dataset, meta)
    first = _same_file(c, name, sha, ref.test_accuracy)
    if not ref.reused and first is not None and first.version != ref.version:
        tr.retry(lambda: c.delete_model_version(name, ref.version))
        return first
    return ref


def _register(c, run_id: str, checkpoint: str | Path, name: str, sha: str, dataset: str, meta: dict[str, Any]
              ) -> ClassifierRef:
    acc = meta.get("test_accuracy")
    info = log_checkpoint_model(c, run_id, checkpoint, "classifier")
    ensure_registered_model(c, name, f"Classifier under audit on {dataset} (tldr weights-only checkpoint).")
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


