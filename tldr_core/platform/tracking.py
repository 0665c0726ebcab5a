"""MLflow tracking for the search: the database and experiment, the parent run of a search, one nested
run per trial, and the parent run's summary (best trial, objective-versus-trial plot, parameter
importances).

Only explicit `MlflowClient`s are used (no fluent `mlflow.start_run` state), so Ray workers, the
driver and tests can share a process safely. Tags written here (all under `tldr.`) are how runs are
found again: `tldr.role` (search | trial), `tldr.search_run`, `tldr.trial_id`, `tldr.state`.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from tldr_core.paths import runs_dir  # noqa: F401 - re-exported: tr.runs_dir()

# Tag keys (one place, so the driver, the workers, the registry and the tests agree).
ROLE = "tldr.role"
SEARCH_RUN = "tldr.search_run"
TRIAL_ID = "tldr.trial_id"
TRIAL_NUMBER = "tldr.trial_number"
STATE = "tldr.state"          # running | finished | early-stopped | failed | interrupted
ERROR = "tldr.error"
NOTE = "tldr.note"
OBJECTIVE = "tldr.objective"
GENERATOR_MODEL = "tldr.generator_model_uri"
GENERATOR_MODEL_ID = "tldr.generator_model_id"
PARENT = "mlflow.parentRunId"

TERMINAL = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable database folder, ...)."""


def quiet_mlflow_env() -> None:
    """No telemetry calls (the machine may be offline), no git probing, bounded HTTP retries."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def default_tracking_uri() -> str:
    return f"sqlite:///{runs_dir() / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("sqlite", "file", "")


def normalize_tracking_uri(uri: str | None) -> str:
    """Absolute sqlite/file URIs (Ray trials run in other working directories)."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return "file://" + str(Path(uri).resolve())
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear message, when the tracking store cannot be reached."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); start it (mlflow/serve.py) or pass another --tracking-uri") from None
        if r.status_code != 200:
            raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {r.status_code}; "
                                "is it an MLflow server (and does --allowed-hosts accept this host)?")
        return
    if parts.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the folder of the tracking database {path}: {exc}") from None
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"the folder of the tracking database {path} is not writable")
        return
    if parts.scheme in ("file", ""):
        return
    # a database URI (postgresql://, mysql://...): open it once
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"
        raise TrackingError(f"tracking store {uri} cannot be used: {type(exc).__name__}: {str(exc)[:300]}") from None


def client(uri: str):
    """An MlflowClient for `uri`; also sets the process-wide URI, which MLflow uses internally (model
    logging, resolving `models:/m-...` sources on registration): never a stray ./mlruns or ./mlflow.db."""
    import mlflow
    from mlflow import MlflowClient

    quiet_mlflow_env()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def retry(fn: Callable[[], Any], what: str = "mlflow call", tries: int = 8) -> Any:
    """Retry a tracking call a few times on transient errors (sqlite 'database is locked', HTTP 5xx)."""
    delay = 0.2
    for attempt in range(tries):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).lower()
            transient = any(s in msg for s in ("database is locked", "locked", "timed out", "temporarily",
                                               "503", "502", "connection reset", "busy"))
            if not transient or attempt == tries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 3.0)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "experiment"


def ensure_experiment(c, name: str, artifact_root: Path | None = None) -> str:
    """Create the experiment (and the database) before any trial runs; returns its id.

    Local stores get an explicit artifact location inside the runs folder; a tracking server decides
    its own (e.g. `mlflow-artifacts:/` when it serves artifacts).
    """
    exp = retry(lambda: c.get_experiment_by_name(name))
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(lambda: c.restore_experiment(exp.experiment_id))
        return exp.experiment_id
    location = None
    if artifact_root is not None and is_local_store(c.tracking_uri):
        location = (artifact_root / _slug(name)).resolve().as_uri()
    try:
        return retry(lambda: c.create_experiment(name, artifact_location=location,
                                                 tags={"tldr.created_by": "tune/search.py"}))
    except Exception:  # created concurrently by someone else
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def metric_batch(values: Mapping[str, Any], step: int, ts: int | None = None) -> list:
    from mlflow.entities import Metric

    ts = ts or int(time.time() * 1000)
    out = []
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isnan(v):
            continue  # MLflow stores NaN, but the UI charts break on it; absence is clearer
        out.append(Metric(k, v, ts, int(step)))
    return out


def log_metrics(c, run_id: str, values: Mapping[str, Any], step: int) -> None:
    batch = metric_batch(values, step)
    for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
        retry(lambda: c.log_batch(run_id, metrics=batch[i:i + 900]))


def log_params(c, run_id: str, values: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(params), 90):
        retry(lambda: c.log_batch(run_id, params=params[i:i + 90]))


def set_tags(c, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    if items:
        retry(lambda: c.log_batch(run_id, tags=items))


def terminate(c, run_id: str, status: str, state: str | None = None, error: str | None = None) -> None:
    """End a run; `error` goes to tldr.error for FAILED runs and to tldr.note otherwise."""
    tags: dict[str, str] = {}
    if state:
        tags[STATE] = state
    if error:
        tags[ERROR if status == "FAILED" else NOTE] = error[:5000]
    if tags:
        set_tags(c, run_id, tags)
    retry(lambda: c.set_terminated(run_id, status=status))


# ------------------------------------------------------------------------------------------- trials

def trial_runs(c, experiment_id: str, search_run_id: str, trial_id: str | None = None,
               include_deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    flt = f"tags.`{SEARCH_RUN}` = '{search_run_id}' and tags.`{ROLE}` = 'trial'"
    if trial_id:
        flt += f" and tags.`{TRIAL_ID}` = '{trial_id}'"
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs, token = [], None
    while True:
        page = retry(lambda: c.search_runs([experiment_id], flt, run_view_type=view, max_results=1000,
                                           page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs




@dataclass
class TrialRun:
    """The nested MLflow run of one Tune trial, as seen from the trial's worker."""

    client: Any
    run_id: str
    experiment_id: str

    @classmethod
    def start(cls, c, experiment_id: str, search_run_id: str, trial_id: str, number: int, run_name: str,
              tags: Mapping[str, Any] | None = None) -> "TrialRun":
        """Create the trial's run; a stale run of the same trial (an attempt interrupted before a resume)
        is deleted first, so every trial has exactly one active run."""
        attempt = 1
        for old in trial_runs(c, experiment_id, search_run_id, trial_id):
            attempt += 1
            if old.info.status == "RUNNING":
                retry(lambda: c.set_terminated(old.info.run_id, status="KILLED"))
            retry(lambda: c.delete_run(old.info.run_id))
        all_tags = {PARENT: search_run_id, SEARCH_RUN: search_run_id, ROLE: "trial", TRIAL_ID: trial_id,
                    TRIAL_NUMBER: str(number), STATE: "running", "tldr.attempt": str(attempt),
                    **{k: str(v) for k, v in (tags or {}).items()}}
        run = retry(lambda: c.create_run(experiment_id, tags=all_tags, run_name=run_name))
        return cls(c, run.info.run_id, experiment_id)

    def log_params(self, values: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, values)

    def log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        log_metrics(self.client, self.run_id, values, step)

    def log_history(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Loss records of train_generator (`step`, `loss`, `loss_<term>`, `wloss_<term>`) in one batch."""
        batch = []
        for r in records:
            batch += metric_batch({k: v for k, v in r.items() if k.startswith(("loss", "wloss"))}, int(r["step"]))
        for i in range(0, len(batch), 900):
            retry(lambda: self.client.log_batch(self.run_id, metrics=batch[i:i + 900]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str, state: str, error: str | None = None) -> None:
        terminate(self.client, self.run_id, status, state, error)

    def fail(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            retry(lambda: self.client.log_text(self.run_id, text, "error.txt"))
        finally:
            self.end("FAILED", "failed", f"{type(exc).__name__}: {exc}")


def close_open_trial_runs(c, experiment_id: str, search_run_id: str, status: str, state: str,
                          reason: str = "") -> list[str]:
    """End every still-RUNNING trial run of a search (after an interruption); returns their ids."""
    closed = []
    for run in trial_runs(c, experiment_id, search_run_id):
        if run.info.status == "RUNNING":
            terminate(c, run.info.run_id, status, state, reason or None)
            closed.append(run.info.run_id)
    return closed


# ------------------------------------------------------------------------------------------- summary

@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    number: int
    status: str
    state: str
    value: float | None          # the objective: final for finished trials, last reported otherwise
    label_agreement: float | None
    params: dict[str, str]
    steps: int | None
    complete: bool


def summarize_trials(c, experiment_id: str, search_run_id: str, objective: str) -> list[TrialSummary]:
    out = []
    for run in trial_runs(c, experiment_id, search_run_id):
        m, t = run.data.metrics, run.data.tags
        value = m.get(objective)
        out.append(TrialSummary(
            run_id=run.info.run_id, trial_id=t.get(TRIAL_ID, ""), number=int(t.get(TRIAL_NUMBER, -1)),
            status=run.info.status, state=t.get(STATE, ""),
            value=None if value is None or math.isnan(value) else float(value),
            label_agreement=m.get("label_agreement"), params=dict(run.data.params),
            steps=int(m["step"]) if "step" in m else None,
            complete=run.info.status == "FINISHED" and t.get(STATE) == "finished"))
    return sorted(out, key=lambda s: (s.number, s.trial_id))


def best_trial(trials: Sequence[TrialSummary]) -> TrialSummary | None:
    """The finished trial with the highest objective (all objectives are maximised)."""
    done = [t for t in trials if t.complete and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def plot_objective(trials: Sequence[TrialSummary], objective: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = {"finished": ("o", "tab:blue", "finished"), "early-stopped": ("v", "tab:orange", "stopped by ASHA"),
              "failed": ("x", "tab:red", "failed"), "interrupted": ("s", "tab:gray", "interrupted")}
    seen = set()
    for t in trials:
        marker, color, label = styles.get(t.state, ("s", "tab:gray", t.state or "other"))
        y = t.value if t.value is not None else float("nan")
        if t.state == "failed" or t.value is None:
            ymin = min((s.value for s in trials if s.value is not None), default=0.0)
            y = ymin
        ax.scatter([t.number], [y], marker=marker, color=color, label=None if label in seen else label, zorder=3)
        seen.add(label)
    best, xs, ys = -math.inf, [], []
    for t in trials:
        if t.complete and t.value is not None:
            best = max(best, t.value)
        if best > -math.inf:
            xs.append(t.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best finished so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial (stopped trials: last reported value; failed: at the bottom)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_importances(trials: Sequence[TrialSummary], space, objective: str) -> dict[str, float]:
    """Optuna (fANOVA) importances over the trials with an objective value.

    The study is rebuilt from the MLflow runs (the searcher's own study is not needed, so this also works
    for a resumed or finished search); see `SearchSpace.importance_features` for the encoding.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for t in trials:
        if t.value is None or t.state == "failed":
            continue
        flat = {}
        for k, v in t.params.items():
            try:
                flat[k] = float(v) if k not in ("variant", "perturbation", "mode", "grad_mode", "grad_scope") else v
            except ValueError:
                flat[k] = v
        values, dists = space.importance_features(flat)
        rows.append((values, dists, t.value))
    if len(rows) < 2:
        return {}
    common = set.intersection(*(set(v) for v, _d, _y in rows))
    varying = [k for k in sorted(common) if len({repr(v[k]) for v, _d, _y in rows}) > 1]
    if not varying:
        return {}
    study = optuna.create_study(direction="maximize")
    for values, dists, y in rows:
        study.add_trial(optuna.trial.create_trial(params={k: values[k] for k in varying},
                                                  distributions={k: dists[k] for k in varying}, value=y))
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception:  # noqa: BLE001 - e.g. too few distinct values: fall back to the simpler evaluator
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in imp.items()}


def plot_importances(imp: Mapping[str, float], objective: str, n_trials: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(items), 3) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance for {objective} (fANOVA, {n_trials} trials)")
    ax.set_title("Optuna parameter importances (log10_<w>: weight, off = one decade below its range)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(c, experiment_id: str, search_run_id: str, objective: str, space, out_dir: Path) -> dict[str, Any]:
    """Best trial, objective plot, importances and a trials table on the parent run; returns the summary."""
    trials = summarize_trials(c, experiment_id, search_run_id, objective)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_trial(trials)
    summary: dict[str, Any] = {
        "objective": objective,
        "trials": len(trials),
        "finished": sum(t.state == "finished" for t in trials),
        "early_stopped": sum(t.state == "early-stopped" for t in trials),
        "failed": sum(t.state == "failed" for t in trials),
        "best": None,
    }
    if trials:
        plot_objective(trials, objective, out_dir / "objective_vs_trial.png")
        retry(lambda: c.log_artifact(search_run_id, str(out_dir / "objective_vs_trial.png"), "summary"))
    table = [{"trial": t.number, "trial_id": t.trial_id, "run_id": t.run_id, "state": t.state, objective: t.value,
              "label_agreement": t.label_agreement, **t.params} for t in trials]
    retry(lambda: c.log_dict(search_run_id, {"trials": table}, "summary/trials.json"))
    try:
        imp = param_importances(trials, space, objective)
    except Exception as exc:  # noqa: BLE001 - a summary plot must never fail the search
        imp = {}
        summary["importance_error"] = f"{type(exc).__name__}: {exc}"
    if imp:
        plot_importances(imp, objective, sum(t.value is not None for t in trials), out_dir / "param_importances.png")
        retry(lambda: c.log_artifact(search_run_id, str(out_dir / "param_importances.png"), "summary"))
        retry(lambda: c.log_dict(search_run_id, imp, "summary/param_importances.json"))
        summary["importances"] = imp
    tags = {"tldr.trials": len(trials), "tldr.trials_finished": summary["finished"],
            "tldr.trials_early_stopped": summary["early_stopped"], "tldr.trials_failed": summary["failed"]}
    metrics: dict[str, float] = {"trials_finished": summary["finished"], "trials_failed": summary["failed"],
                                 "trials_early_stopped": summary["early_stopped"]}
    if best is not None:
        summary["best"] = {"run_id": best.run_id, "trial_id": best.trial_id, "number": best.number,
                           objective: best.value, "label_agreement": best.label_agreement, "params": best.params}
        tags.update({"tldr.best_run": best.run_id, "tldr.best_trial": best.trial_id})
        tags.update({f"best.{k}": v for k, v in best.params.items()})
        metrics[f"best_{objective}"] = best.value
        if best.label_agreement is not None:
            metrics["best_label_agreement"] = best.label_agreement
    set_tags(c, search_run_id, tags)
    log_metrics(c, search_run_id, metrics, step=0)
    retry(lambda: c.log_dict(search_run_id, json.loads(json.dumps(summary, default=str)), "summary/summary.json"))
    return summary


def tcp_reachable(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to host:port succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
