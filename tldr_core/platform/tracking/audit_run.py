"""The audit in MLflow (`tldr audit --tracking-uri [URI]`, or an audit of a `models:/` classifier).

One run per audit in the experiment `tldr-<dataset>` (beside the searches; tag `tldr.role=audit`): the
attack's settings and the data set's sizes as params, the scores as `eval/<score>`, the baselines as
`baseline/<set>/<score>`, the verdict as tags (`tldr.risk`, `tldr.risk_reason`) and the metric
`verdict/level` (0 LOW, 1 MEDIUM, 2 HIGH), the data sets (T, H', test) as its inputs, every file of
`--out` as its artifacts and the generator as a pyfunc model (logged with the run active, so it sits
in the run's Models column). When the classifier came from the registry, its version gets the
verdict as the re-audit's `audit.*` tags, so `tune/reaudit.py --dry-run` counts it as audited.

Nothing is created in the tracking store before the audit's data and classifier are loaded and its
files written: `check_target` only checks that the store can be reached.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from tldr_core.platform.tracking import store as tr

ROLE_AUDIT = "audit"
SOURCE = "tldr audit"


def target_uri(tracking_uri: str | None, classifier: str | None) -> str | None:
    """The store an audit logs to: --tracking-uri's (an empty value: the default store), the default store
    for a `models:/` classifier (it came from there), else None (not logged). TrackingError for a URI
    no driver can open."""
    if tracking_uri is None and not (classifier or "").startswith("models:/"):
        return None
    import os

    from tldr_core.platform.tracking.uris import UriError, normalize_tracking_uri

    try:
        return normalize_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    except UriError as exc:
        raise tr.TrackingError(str(exc)) from None


def check_target(uri: str | None, classifier: str | None) -> None:
    """Before any work: the store answers (nothing is created), a `models:/` URI is well formed, and a
    sqlite store that should hold a registered classifier exists."""
    if uri is None:
        return
    tr.check_tracking_uri(uri)
    if urlsplit(uri).scheme in ("http", "https"):  # /health answered; does the API (read-only call)?
        try:
            tr.client(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MlflowException, invalid JSON, ...: unusable either way
            raise tr.TrackingError(tr.redact(f"MLflow tracking server {uri} answers /health but not its API "
                                             f"({type(exc).__name__}: {_first_line(exc)})")) from None
    if (classifier or "").startswith("models:/"):
        from tldr_core.platform.registry.names import parse_models_uri

        parse_models_uri(classifier)
        db = tr.sqlite_path(uri)
        if db is not None and not db.exists():
            raise tr.TrackingError(f"--classifier {classifier}: the tracking store {db} does not exist, so it holds "
                                   "no registered model (pass the --tracking-uri that registered it)")


def load_registered(uri: str, models_uri: str) -> tuple[Any, dict[str, Any]]:
    """(classifier, meta) of a registered classifier version, loaded weights-only; meta["registry"] names
    the version and meta["path"] is the URI (what metrics.json records as the classifier)."""
    from tldr_core.platform.registry.models import load_registered_classifier

    try:
        model, meta, ref, _path = load_registered_classifier(tr.client(uri), models_uri)
    except Exception as exc:  # noqa: BLE001 - MlflowException etc.: one line for the user
        if isinstance(exc, tr.TrackingError) or type(exc).__name__ in ("RegistryError", "CheckpointError"):
            raise
        raise tr.TrackingError(f"--classifier {models_uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return model, {**meta, "path": models_uri, "registry": {"name": ref.name, "version": ref.version}}


def _params(record: dict[str, Any]) -> dict[str, Any]:
    ds = record.get("dataset", {})
    clf = record.get("classifier", {})
    return {**record.get("settings", {}), "attack": record.get("attack"), "dataset": ds.get("name"),
            "train_size": ds.get("train_size"), "heldout_size": ds.get("heldout_size"), "test_size": ds.get("test_size"),
            "classifier": clf.get("path", ""), "classifier_test_accuracy": clf.get("test_accuracy")}


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    from tldr_core.scoring.risk import LEVELS

    out = tr.metric_names("eval", record.get("metrics", {}))
    for name, scores in record.get("baselines", {}).items():
        out.update(tr.metric_names(f"baseline/{name}", scores))
    out["verdict/level"] = LEVELS.index(record["risk"])
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def log_audit(uri: str, out_dir: Path, record: dict[str, Any], bundle: Any,
              say: Callable[[str], None] = print) -> str:
    """Record a written audit (`out_dir`, its metrics.json `record`) as one MLflow run; returns its id.
    A store that fails now (after the audit's files are written) is a TrackingError saying so: one line."""
    try:
        return _log_audit(uri, out_dir, record, bundle, say)
    except tr.TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, HTTP errors, invalid JSON
        raise tr.TrackingError(tr.redact(f"the audit is written in {out_dir}, but logging it to MLflow at {uri} "
                                         f"failed ({type(exc).__name__}: {_first_line(exc)})")) from None


def _log_audit(uri: str, out_dir: Path, record: dict[str, Any], bundle: Any, say: Callable[[str], None]) -> str:
    c = tr.client(uri)
    experiment = f"tldr-{record['dataset']['name']}"
    exp = tr.ensure_experiment(c, experiment, tr.runs_dir() / "mlartifacts")
    tags = {**tr.context_tags(SOURCE), tr.ROLE: ROLE_AUDIT, tr.STATE: "running", tr.ATTACK: record["attack"],
            "tldr.dataset": record["dataset"]["name"], "tldr.risk": record["risk"],
            "tldr.risk_reason": "; ".join(record.get("reasons", []))[:4000], "tldr.risk_attack": record["risk_attack"],
            "tldr.out": str(out_dir)}
    run = tr.retry(lambda: c.create_run(exp, tags=tags, run_name=f"audit-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_id = run.info.run_id
    with tr.active_run(run_id):  # the generator lands in this run's Models column; FAILED on an exception
        tr.log_params(c, run_id, _params(record))
        tr.log_metrics(c, run_id, _metrics(record), step=0)
        tr.retry(lambda: c.log_inputs(run_id, datasets=tr.dataset_inputs(bundle)))
        tr.retry(lambda: c.log_artifacts(run_id, str(out_dir)))
        generator = out_dir / "generator.pt"
        if generator.is_file():
            from tldr_core.platform.registry.models import log_checkpoint_model

            log_checkpoint_model(c, run_id, generator, "generator")
    tr.terminate(c, run_id, "FINISHED", "finished")
    registry = record.get("classifier", {}).get("registry")
    if registry:
        tag_classifier_version(c, registry["name"], registry["version"], record, run_id)
    say(f"mlflow: audit run {run_id} in experiment {experiment!r} ({tr.redact(uri)})"
        + (f"; {registry['name']} version {registry['version']} tagged audit.risk={record['risk']}" if registry else ""))
    return run_id


def tag_classifier_version(c, name: str, version: str, record: dict[str, Any], run_id: str) -> None:
    """The audit's verdict on the registered classifier version, as the re-audit writes it (audit.*)."""
    from tldr_core.platform.registry.audits.audit_tags import Candidate, set_audit_tags

    m = record.get("metrics", {})
    results = {"audit.risk": record["risk"], "audit.risk_reason": "; ".join(record.get("reasons", []))[:480],
               "audit.run_id": run_id}
    for k in ("quality", "gap", "gap_ci_low", "gap_ci_high", "coverage", "label_agreement"):
        if m.get(k) is not None:
            results[f"audit.{k}"] = f"{m[k]:.6g}"
    set_audit_tags(c, Candidate(name, str(version), record["dataset"]["name"], "audit"), results)
