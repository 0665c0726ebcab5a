"""Offline LiRA's reference models trained as parallel Ray tasks, and the audit's membership stage
(docs/method.md §10).

:func:`train_references` returns K reference classifiers in order. Those already in the classifier
cache are loaded here without Ray; the others are trained as Ray tasks of one CPU each (a local Ray
with this machine's cores unless one is running or ``address`` names a cluster; the same code on
a cluster). Each task calls :func:`tldr_core.attack.reference_models.load_or_train_reference`, so
the training code never imports Ray and every reference lands in the cache like any classifier:
a second audit of the same data and settings trains nothing. Ray is started the way the search
starts it (the search's worker environment and temp folder; RAY_AUTH_MODE kept on a cluster).

:func:`membership_stage` is the one call of the audit: references (K >= 2), then every membership
score of T and H' (:func:`tldr_core.scoring.mia.score_membership`).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from tldr_core.attack.checkpoints import CheckpointError, load_classifier
from tldr_core.attack.classifier import ClassifierSettings, default_cache_dir
from tldr_core.attack.data import DatasetBundle
from tldr_core.attack.reference_models import load_or_train_reference, reference_cache_path
from tldr_core.paths import runs_dir
from tldr_core.scoring.mia import DEFAULT_FPRS, MembershipResult, score_membership

__all__ = ["DEFAULT_K", "MembershipStageError", "Reference", "train_references", "membership_stage"]

#: Reference models of a default audit: enough for LiRA's pooled-variance fit (docs/method.md §10),
#: about 8 classifier trainings' time on a 2-core laptop (two at a time).
DEFAULT_K = 8


class MembershipStageError(RuntimeError):
    """The references could not be trained: Ray unreachable or a training task failed (message says which)."""


@dataclass(frozen=True)
class Reference:
    """Reference model ``k``: the classifier, its meta (train_seconds, test_accuracy, ...), its cache
    file (on the machine that trained it) and whether it came from the cache."""

    k: int
    model: nn.Module
    meta: dict[str, Any]
    path: Path
    cached: bool


def _train_task(bundle: DatasetBundle, settings: ClassifierSettings, k: int, cache_dir: str | None,
                device: str) -> tuple[nn.Module, dict[str, Any], str]:
    """What a Ray worker runs: one reference, trained (or found in the worker's cache)."""
    import torch

    torch.set_num_threads(1)  # one CPU per task: more threads only fight the other tasks
    model, meta, path = load_or_train_reference(bundle, settings, k, cache_dir=cache_dir, device=device,
                                                log=lambda _line: None)
    return model, meta, str(path)


def _cached(bundle: DatasetBundle, settings: ClassifierSettings, k: int, cache_dir: Path) -> Reference | None:
    path = reference_cache_path(bundle, settings, k, cache_dir)
    if not path.exists():
        return None
    try:
        model, meta = load_classifier(path)
    except CheckpointError:  # damaged: the task retrains it (load_or_train never trusts it either)
        return None
    return Reference(k, model, meta, path, cached=True)


def _start_ray(address: str | None, num_cpus: int | None, log: Callable[[str], None]) -> tuple[bool, Path | None]:
    """Start (or join) Ray unless this process already has it. Returns (started here, temp folder to
    remove after)."""
    import ray

    from tldr_core.platform.search.settings import SearchError
    from tldr_core.platform.search.tuner import _worker_env, check_ray_address, ray_temp_dir

    if ray.is_initialized():
        return False, None
    env, remove_after = _worker_env(address is None), None
    if address is None:
        temp_dir = ray_temp_dir()
        if not str(temp_dir).startswith(str(runs_dir())) and not temp_dir.exists():
            remove_after = temp_dir  # a short stand-in outside runs/ (socket path length): removed after
        temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(temp_dir), runtime_env={"env_vars": env}, logging_level="ERROR",
                 configure_logging=True)
    else:
        try:
            check_ray_address(address)
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env}, logging_level="ERROR")
        except (SearchError, ConnectionError, RuntimeError) as exc:
            raise MembershipStageError(f"cannot use the Ray cluster at {address}: {exc}") from None
    log(f"references: ray with {ray.cluster_resources().get('CPU', 0):g} CPUs")
    return True, remove_after


def _run_tasks(bundle: DatasetBundle, settings: ClassifierSettings, todo: Sequence[int], cache_dir: str | None,
               gpus_per_task: float, log: Callable[[str], None]) -> dict[int, Reference]:
    """Train the references ``todo`` as Ray tasks; progress as each one finishes."""
    import ray

    device = "cuda" if gpus_per_task > 0 else "cpu"
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=0)(_train_task)
    shared = ray.put(bundle)  # one copy in the object store for all tasks
    pending = {task.remote(shared, settings, k, cache_dir, device): k for k in todo}
    out: dict[int, Reference] = {}
    t0 = time.time()
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(done)
        try:
            model, meta, path = ray.get(done)
        except Exception as exc:  # a RayTaskError wraps the worker's exception
            for ref in pending:
                ray.cancel(ref)
            raise MembershipStageError(f"reference model {k} failed to train: {exc}") from None
        out[k] = Reference(k, model, meta, Path(path), cached=False)
        log(f"references: {len(out)}/{len(todo)} trained (reference {k}: {meta.get('train_seconds', 0):.0f}s, test "
            f"accuracy {meta.get('test_accuracy', float('nan')):.3f}; {time.time() - t0:.0f}s so far)")
    return out


def train_references(bundle: DatasetBundle, settings: ClassifierSettings, k: int, *, address: str | None = None,
                     cache_dir: str | Path | None = None, num_cpus: int | None = None, gpus_per_task: float = 0.0,
                     log: Callable[[str], None] = print) -> list[Reference]:
    """Reference models 0..k-1 for the audit of a classifier trained on ``bundle.train`` with ``settings``.

    Args:
        bundle: the audit's data; references train on subsets of ``bundle.test`` (P) only.
        settings: the audited classifier's training settings (e.g. ``settings_from_meta``).
        k: how many references.
        address: a Ray cluster (host:port, ray://host:port or auto); None: a local Ray.
        cache_dir: the classifier cache (default: the usual one). On a cluster, None lets each
            worker use its own default; the driver looks in its own default first either way.
        num_cpus: CPUs of a local Ray (default: all of this machine's).
        gpus_per_task: > 0 trains each reference on a GPU share ("cuda").

    Returns the K references in order of k. Ray is shut down afterwards if this call started it.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    local_cache = Path(cache_dir) if cache_dir else default_cache_dir()
    found = {i: ref for i in range(k) if (ref := _cached(bundle, settings, i, local_cache)) is not None}
    todo = [i for i in range(k) if i not in found]
    if found:
        log(f"references: {len(found)} of {k} found in the cache {local_cache}")
    if todo:
        import ray

        # a local Ray's workers share this file system: hand them the resolved folder
        task_cache = str(local_cache) if cache_dir or address is None else None
        log(f"references: training {len(todo)} {settings.arch} classifiers on Ray, one CPU each")
        started, remove_after = _start_ray(address, num_cpus, log)
        try:
            found.update(_run_tasks(bundle, settings, todo, task_cache, gpus_per_task, log))
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
            if remove_after is not None:
                shutil.rmtree(remove_after, ignore_errors=True)
    return [found[i] for i in range(k)]


def membership_stage(classifier: nn.Module, bundle: DatasetBundle, settings: ClassifierSettings, *, k: int,
                     address: str | None = None, log: Callable[[str], None] = print,
                     cache_dir: str | Path | None = None, num_cpus: int | None = None, gpus_per_task: float = 0.0,
                     fprs: Sequence[float] = DEFAULT_FPRS, n_boot: int = 1000, seed: int = 0) -> MembershipResult:
    """The audit's membership inference: K references (none when k = 0: loss and margin only), then
    the scores of T and H' and their summaries. ``k = 1`` is refused (LiRA needs a spread)."""
    if k == 1:
        raise ValueError("offline LiRA needs at least 2 reference models (k = 0 runs the loss and margin attacks only)")
    t0 = time.time()
    refs = train_references(bundle, settings, k, address=address, cache_dir=cache_dir, num_cpus=num_cpus,
                            gpus_per_task=gpus_per_task, log=log) if k else []
    result = score_membership(classifier, bundle.train, bundle.heldout, references=[r.model for r in refs],
                              fprs=fprs, n_boot=n_boot, seed=seed)
    s = result.summaries[result.best]
    log(f"membership ({result.best}{f', K = {k}' if k else ''}): AUC {s.auc:.3f} [{s.auc_ci[0]:.3f}, "
        f"{s.auc_ci[1]:.3f}], TPR at {s.fprs[0]:.1%} FPR {s.tpr[0]:.3f} ({time.time() - t0:.0f}s)")
    return result
