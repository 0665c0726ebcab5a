"""MLflow helpers shared by the search, its trials, the registry and the re-audit: the tracking store
(URI, reachability, client), retried logging calls, experiments, run tags, and logging a report.

Runs are written through explicit `MlflowClient`s; a run is made MLflow's *active* run only while
models are logged into it (`active_run`), so logged models land in the run's experiment and its
Models column. Tags written by the platform (all under `tldr.`) are how runs are found again:
`tldr.role` (search | trial | audit), `tldr.search_run`, `tldr.trial_id`, `tldr.state`, `tldr.end`.

Metric names are grouped the way the MLflow UI groups charts (by the prefix before the last `/`):
`eval/<score>`, `loss/<term>`, `wloss/<term>` (term names: `LossWeights`), `train/...`, and on the
search run `baseline/<set>/<score>`; the objective is also logged as `Objective/<name>`: the UI sorts
chart sections in plain string order (capitals first), so its section is the first (`objective_name`).

Credentials never leave through a printed or logged URI: `redact` masks `user:password@` and
password-like query values in any text.

Sibling modules: `uris` (tracking URIs, `redact`), `trial_runs` (a trial's nested run, the trials of a
search); elsewhere: `search.summary` (the parent run's summary, plots and parameter importances),
`platform.probe` (TCP reachability).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from tldr_core.paths import runs_dir  # noqa: F401 - re-exported: tr.runs_dir()
# one implementation each, re-exported (tr.redact, tr.normalize_tracking_uri, tr.default_tracking_uri)
from tldr_core.platform.tracking.uris import default_tracking_uri, normalize_tracking_uri, redact  # noqa: F401

# Tag keys (one place, so the driver, the workers, the registry and the tests agree).
ROLE = "tldr.role"
SEARCH_RUN = "tldr.search_run"
TRIAL_ID = "tldr.trial_id"
TRIAL_NUMBER = "tldr.trial_number"
STATE = "tldr.state"          # running | finished | early-stopped | failed | interrupted
END = "tldr.end"              # how a run ended (finished | early-stopped | failed | interrupted)
ERROR = "tldr.error"
NOTE = "tldr.note"
OBJECTIVE = "tldr.objective"
ATTACK = "tldr.attack"        # tldr | kkt: what a search's trials run (absent on older runs: tldr)
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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    return Path(uri[len("sqlite:///"):]) if urlsplit(uri).scheme == "sqlite" else None


def is_local_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("sqlite", "file", "")


def _check_http(uri: str, timeout: float) -> None:
    import requests

    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(redact(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); start it (mlflow/serve.py) or pass another --tracking-uri")) from None
    if r.status_code != 200:
        raise TrackingError(f"MLflow tracking server {redact(uri)} answered /health with HTTP {r.status_code}; "
                            "is it an MLflow server (and does --allowed-hosts accept this host)?")


def _check_sqlite(uri: str) -> None:
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"cannot create the folder of the tracking database {path}: {exc}") from None
    if not os.access(path.parent, os.W_OK):
        raise TrackingError(f"the folder of the tracking database {path} is not writable")


#: Default ports of the database schemes MLflow (SQLAlchemy) opens.
DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def _check_db_port(uri: str, timeout: float) -> None:
    """TrackingError unless the database's host:port accepts a TCP connection within ``timeout``; skipped for
    a Unix socket (no host, or ?host=/path) and unknown schemes."""
    from tldr_core.platform.probe import tcp_reachable

    parts = urlsplit(uri)
    try:
        port = parts.port or DB_PORTS.get(parts.scheme.split("+")[0])
    except ValueError as exc:  # e.g. "host:abc"
        raise TrackingError(redact(f"tracking store {uri}: {exc}")) from None
    if not parts.hostname or port is None or "host=/" in parts.query:
        return
    why = tcp_reachable(parts.hostname, port, timeout)
    if why is not None:
        raise TrackingError(redact(f"tracking store {uri} is unreachable: nothing answers at {parts.hostname}:{port} "
                                   f"({why}); start the database or pass another --tracking-uri"))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear `TrackingError`, when the tracking store cannot be reached."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        return _check_http(uri, timeout)
    if scheme == "sqlite":
        return _check_sqlite(uri)
    if scheme in ("file", ""):
        return None
    # a database URI (postgresql://, mysql://...): its port first, then open it once. Without the probe a
    # closed port took MLflow's and the driver's retries: 106 s for postgresql:// to a closed port.
    _check_db_port(uri, timeout)
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"
        raise TrackingError(redact(f"tracking store {uri} cannot be used: {type(exc).__name__}: {str(exc)[:300]}")) from None
    return None


_READY: set[str] = set()  # sqlite stores this process has created or checked under the lock
# A schema-only sqlite file made by this MLflow (`mlflow db upgrade` on an empty file): a new store starts
# as a copy of it when it exists. MLflow's migrations take seconds for every new store; the test suite
# makes one per session. MLflow still adds the Default experiment and checks the schema's revision.
BLANK_STORE_ENV = "TLDR_MLFLOW_BLANK_DB"


def _copy_blank_store(db: Path) -> None:
    blank = os.environ.get(BLANK_STORE_ENV)
    if not blank or db.exists() or not Path(blank).is_file():
        return
    import shutil

    part = db.with_name(db.name + ".part")
    shutil.copyfile(blank, part)
    os.replace(part, db)  # whole or not at all


def _create_sqlite_store(uri: str) -> None:
    """Create (or migrate) a sqlite store's schema while holding `<db>.lock`: MLflow's schema creation
    is not safe against a second process doing the same on a fresh file (both fail, and the
    database is left half-made). Opening both stores (tracking and registry) runs their checks."""
    from mlflow import MlflowClient

    from tldr_core.locks import file_lock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock"), timeout=300):
        _copy_blank_store(db)
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
        c.search_registered_models(max_results=1)
    _READY.add(uri)


def client(uri: str):
    """An MlflowClient for `uri`; also sets the process-wide URI, which MLflow uses internally (model
    logging, resolving `models:/m-...` sources on registration): never a stray ./mlruns or ./mlflow.db.
    A sqlite store is created under a file lock first (`_create_sqlite_store`)."""
    import mlflow
    from mlflow import MlflowClient

    quiet_mlflow_env()
    if urlsplit(uri).scheme == "sqlite" and uri not in _READY:
        _create_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def context_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's own run-context tags (`mlflow.user`, `mlflow.source.name`/`.type`, the git commit when
    there is one), as `mlflow.start_run` would set them; `source` names the command (default argv[0]).
    Computed once by the driver and given to the trials: a Ray worker's argv is Ray's, not the user's."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items()}
    if source:
        tags["mlflow.source.name"] = source
    return tags


@contextmanager
def active_run(run_id: str):
    """Make `run_id` MLflow's active run for the block (models logged inside it then belong to the run
    and its experiment, not to experiment 0), and end it as FINISHED, or FAILED on an exception.
    Use it for a run's last step only: leaving the block ends the run."""
    import mlflow

    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield current
        return
    with mlflow.start_run(run_id=run_id, nested=current is not None) as run:
        yield run


def metric_names(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` under `prefix/` (`eval/quality`, `baseline/noise/quality`): one MLflow chart section."""
    return {f"{prefix}/{k}": v for k, v in values.items()}


def loss_names(record: Mapping[str, Any]) -> dict[str, float]:
    """A training record's losses as MLflow names: `loss` -> `loss/total`, `loss_<term>` -> `loss/<term>`,
    `wloss_<term>` -> `wloss/<term>` (the term names are the records', i.e. `LossWeights`')."""
    out = {}
    for k, v in record.items():
        if k == "loss":
            out["loss/total"] = v
        elif k.startswith(("loss_", "wloss_")):
            group, term = k.split("_", 1)
            out[f"{group}/{term}"] = v
    return out


def objective_name(objective: str) -> str:
    """The objective's own metric name: the UI sorts chart sections by plain string order (capitals
    first; unprefixed metrics last), so the `Objective` section comes before `eval`, `loss`, ..."""
    return f"Objective/{objective}"


def scores_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The `eval/` metrics of a run by their score names (`eval/quality` -> `quality`)."""
    return {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}


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

    params = [Param(k, redact(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(params), 90):
        retry(lambda: c.log_batch(run_id, params=params[i:i + 90]))


def set_tags(c, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, redact(v)[:5000]) for k, v in tags.items()]
    if items:
        retry(lambda: c.log_batch(run_id, tags=items))


def terminate(c, run_id: str, status: str, state: str | None = None, error: str | None = None) -> None:
    """End a run; `error` goes to tldr.error for FAILED runs and to tldr.note otherwise."""
    tags: dict[str, str] = {}
    if state:
        tags[STATE] = state
        if status in TERMINAL:
            tags[END] = state
    if error:
        tags[ERROR if status == "FAILED" else NOTE] = error[:5000]
    if tags:
        set_tags(c, run_id, tags)
    retry(lambda: c.set_terminated(run_id, status=status))


def log_report_to_mlflow(html_path: str | Path, run_id: str | None = None, *, artifact_path: str | None = None,
                         tracking_uri: str | None = None, client=None) -> None:
    """Log an HTML report (or any file) as an artifact beside a run; the MLflow UI shows HTML artifacts.

    To `run_id` through an MlflowClient (`client`, or one for `tracking_uri`), or to the active fluent
    run when run_id is None.
    """
    import mlflow

    if run_id is None:
        mlflow.log_artifact(str(html_path), artifact_path)
        return
    client = client or mlflow.MlflowClient(tracking_uri=tracking_uri)
    retry(lambda: client.log_artifact(run_id, str(html_path), artifact_path), what="log report")


#: (split of a DatasetBundle, the input's context tag): what a run's "Datasets" show
DATA_SPLITS = (("train", "training"), ("heldout", "heldout"), ("test", "test"))


def dataset_inputs(bundle: Any) -> list:
    """mlflow DatasetInputs of `bundle`'s T, H' and test split, for `MlflowClient.log_inputs`: each a
    numpy data set `<data set>/<split>` whose digest is computed from its images and labels (the same
    split shows the same digest in every run) and whose source says where the images came from."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    out = []
    for split, context in DATA_SPLITS:
        part = getattr(bundle, split, None)
        if part is None or len(part) == 0:
            continue
        source = CodeDatasetSource({"dataset": bundle.name, "split": split, "source": str(bundle.source)})
        ds = mlflow.data.from_numpy(part.images.detach().cpu().numpy(), targets=part.labels.detach().cpu().numpy(),
                                    source=source, name=f"{bundle.name}/{split}")
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    return out
