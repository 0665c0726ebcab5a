"""The Ray side of a search's driver: checking a cluster address, starting (or joining) Ray, and the
Tuner: Optuna's TPE sampler behind a concurrency limit, ASHA (or FIFO) on generator steps, and the
MLflow status callback; or the saved Tuner of an interrupted search, restored (also one saved before
the platform's modules moved into sub-packages: `alias_moved_modules`)."""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.probe import tcp_reachable
from tldr_core.platform.search.settings import SearchError, SearchSettings
from tldr_core.platform.tracking import store as tr

_NEW = "tldr_core.platform.search."
#: old module -> the modules now holding what it held: a Tuner state saved before the move pickled its search
#: space and its callback under the old names.
MOVED_MODULES = {
    "tldr_core.platform.search_space": (_NEW + "spaces.tldr_space",),
    "tldr_core.platform.space_specs": (_NEW + "spaces.specs",),
    "tldr_core.platform.kkt_space": (_NEW + "spaces.kkt_space",),
    "tldr_core.platform.trial_status": (_NEW + "trial_status",),
    "tldr_core.platform.tuning": (_NEW + "trial", _NEW + "trial_inputs", _NEW + "trial_status"),
}


def check_ray_address(address: str | None) -> None:
    """SearchError unless `address` (host:port or ray://host:port) accepts a TCP connection.

    None (a local Ray is started) and "auto" (ray.init reports a missing cluster at once) pass."""
    if address is None or address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"--address {address!r}: expected host:port, ray://host:port or auto")
    why = tcp_reachable(host, int(port), timeout=5)
    if why:
        raise SearchError(f"Ray cluster at {address} is unreachable ({why}); start it or drop --address "
                          "to run a local Ray")


def ray_temp_dir() -> Path:
    """Ray's temp/session folder inside the runs folder, unless that path is too long for its sockets."""
    preferred = tr.runs_dir() / "ray"
    if len(str(preferred)) <= 40:
        return preferred
    digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:8]
    short = Path(tempfile.gettempdir()) / f"tldr-ray-{digest}"
    if len(str(short)) > 40:
        short = Path("/tmp") / f"tldr-ray-{digest}"
    return short


def _package_root() -> str:
    """The folder holding the imported tldr_core package: local Ray workers import it from there
    (a checkout run by path is not installed; an installed package is on their path anyway)."""
    import tldr_core

    return str(Path(list(tldr_core.__path__)[0]).resolve().parent)


def _worker_env(local: bool) -> dict[str, str]:
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "GIT_PYTHON_REFRESH": "quiet",
           "PYTHONUNBUFFERED": "1"}
    if local:
        tmp = tr.runs_dir() / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join([_package_root(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update({"PYTHONPATH": path, "TMPDIR": str(tmp), "TLDR_RUNS": str(tr.runs_dir()),
                    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    # On a cluster the workers keep the cluster's auth mode: forcing "disabled" there kills every worker
    # of a token-auth cluster (k8s/) at start (tests/deploy/test_cluster_path.py).
    return env


def start_ray(st: SearchSettings, address: str | None, say: Callable[[str], None]) -> Path | None:
    """ray.init: a local Ray with this machine's cores, or the cluster at `address`. Returns a short
    temp folder outside the runs folder that `stop_ray` should remove, or None."""
    import ray

    env, remove_after = _worker_env(address is None), None
    if address is None:
        temp_dir = ray_temp_dir()
        if not str(temp_dir).startswith(str(tr.runs_dir())) and not temp_dir.exists():
            remove_after = temp_dir  # a short stand-in outside runs/: removed when the search ends
        temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=str(temp_dir),
                 runtime_env={"env_vars": env}, logging_level="ERROR", configure_logging=True)
    else:
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env}, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as exc:
            raise SearchError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    res = ray.cluster_resources()
    say(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; {st.max_concurrent} trials at once, "
        f"{st.cpus_per_trial:g} CPU + {st.gpus_per_trial:g} GPU each")
    return remove_after


def stop_ray(remove_after: Path | None) -> None:
    """Shut Ray down if this process started or joined it; remove the short temp folder."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if remove_after is not None:
        shutil.rmtree(remove_after, ignore_errors=True)


def alias_moved_modules() -> None:
    """Make each old module name of `MOVED_MODULES` importable (a module holding its new modules' names), so
    `--resume` of a search interrupted before the move unpickles its saved state."""
    for old, new in MOVED_MODULES.items():
        if old not in sys.modules:
            alias = types.ModuleType(old)
            for name in new:
                alias.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items()
                                       if not k.startswith("__")})
            sys.modules[old] = alias


def build_tuner(st: SearchSettings, inputs: Any, space: Any, experiment_id: str, search_run_id: str,
                resume: bool, say: Callable[[str], None]):
    """The Tuner of this search; an interrupted one (resume) continues from its saved state."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    from tldr_core.platform.search.trial_status import MlflowTrialStatus
    from tldr_core.platform.search.trial import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainable = tune.with_resources(tune.with_parameters(run_trial, inputs=inputs),
                                    {"cpu": st.cpus_per_trial, "gpu": st.gpus_per_trial})
    path = f"{st.storage.rstrip('/')}/{st.search_name}"
    if resume and tune.Tuner.can_restore(path):
        say(f"resuming the Ray Tune state in {path}")
        alias_moved_modules()
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    points = [space.to_optuna_params(p) for p in space.initial_points]
    searcher = OptunaSearch(space=space, metric=st.objective, mode="max", seed=st.seed,
                            points_to_evaluate=points or None)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=st.max_concurrent)
    scheduler = (FIFOScheduler() if st.scheduler == "fifo" else
                 ASHAScheduler(time_attr="step", max_t=st.steps, grace_period=st.eval_every, reduction_factor=2))
    callback = MlflowTrialStatus(st.tracking_uri, experiment_id, search_run_id, st.objective, st.trials, printer=say,
                                 run_tags=inputs.run_tags)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=st.trials,
                                    metric=st.objective, mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name=st.search_name, storage_path=st.storage, callbacks=[callback], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
