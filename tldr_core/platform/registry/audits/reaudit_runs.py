"""The re-audit's MLflow runs: one run per version audit (the whole audit folder, report.html included, as
its artifacts), and one history run per registered model (its verdict axes over its versions).

Version audit run (experiment `tldr-<dataset>`, name `reaudit-<model>-v<version>`): tags `tldr.role=audit`,
`tldr.reaudit=true`, `tldr.model_version` (the models:/ URI), the verdict (`tldr.risk`, `tldr.membership`,
`tldr.regression`); params as `tldr audit --tracking-uri` logs them; metrics `eval/<score>`,
`baseline/<set>/<score>`, `verdict/level`, `verdict/membership_level` and the comparison's
`compare/<axis>/<stat>` (difference, `_lo`, `_hi`); T, H' and the population as its inputs.

History run (same experiment, name `history-<model>`, tags `tldr.role=history`, `tldr.model`): created
once per model and reused; each re-audit rewrites its artifacts `history.png`, `history.csv` and
`history.json` (every audited version) and logs the audited version's numbers as metrics `history/<axis>`
at step = the version number, so the UI's metric charts show the trend over versions (a version audited
twice has two points at its step; the files hold the latest).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tldr_core.platform.tracking import store as tr

ROLE_HISTORY = "history"
MODEL_TAG = "tldr.model"
SOURCE = "tldr reaudit"


def experiment_for(c, dataset: str) -> str:
    return tr.ensure_experiment(c, f"tldr-{dataset}", tr.runs_dir() / "mlartifacts")


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the store is a server (http/https), else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tr.redact(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _compare_metrics(cmp: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for axis in (cmp or {}).get("axes", []):
        for stat, d in axis["differences"].items():
            key = f"compare/{axis['axis']}/{stat}"
            out.update({key: d["delta"], f"{key}_lo": d["ci_low"], f"{key}_hi": d["ci_high"]})
    return {k: v for k, v in out.items() if v is not None and not math.isnan(v)}


def log_version_audit(c, folder: Path, record: dict[str, Any], bundle: Any, model_uri: str,
                      cmp: dict[str, Any] | None, extra_tags: dict[str, str]) -> tuple[str, str]:
    """One MLflow run holding a version's audit (module doc); returns (run id, experiment id)."""
    from tldr_core.platform.tracking.audit_run import _metrics, _params
    from tldr_core.scoring.risk import LEVELS

    exp = experiment_for(c, record["dataset"]["name"])
    verdict = record.get("verdict") or {}
    tags = {**tr.context_tags(SOURCE), tr.ROLE: "audit", tr.STATE: "running", tr.ATTACK: record["attack"],
            "tldr.reaudit": "true", "tldr.model_version": model_uri, "tldr.dataset": record["dataset"]["name"],
            "tldr.risk": record["risk"], "tldr.risk_attack": record["risk_attack"],
            "tldr.risk_reason": "; ".join(record.get("reasons", []))[:4000],
            "tldr.membership": verdict.get("membership", "not run"), **extra_tags}
    name = model_uri.removeprefix("models:/").replace("/", "-v")
    run = tr.retry(lambda: c.create_run(exp, tags=tags, run_name=f"reaudit-{name}"))
    run_id = run.info.run_id
    try:
        tr.log_params(c, run_id, _params(record))
        metrics = {**_metrics(record), **_compare_metrics(cmp)}
        if verdict.get("membership") in LEVELS:
            metrics["verdict/membership_level"] = LEVELS.index(verdict["membership"])
        tr.log_metrics(c, run_id, metrics, step=0)
        tr.retry(lambda: c.log_inputs(run_id, datasets=tr.dataset_inputs(bundle)))
        tr.retry(lambda: c.log_artifacts(run_id, str(folder)))
    except BaseException as exc:
        tr.terminate(c, run_id, "FAILED", "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    tr.terminate(c, run_id, "FINISHED", "finished")
    return run_id, exp


def history_run(c, name: str, dataset: str) -> tuple[str, str]:
    """(run id, experiment id) of the model's history run, created on first use."""
    exp = experiment_for(c, dataset)
    found = tr.retry(lambda: c.search_runs(
        [exp], f"tags.`{tr.ROLE}` = '{ROLE_HISTORY}' and tags.`{MODEL_TAG}` = '{name}'", max_results=1,
        order_by=["attributes.start_time ASC"]))
    if found:
        return found[0].info.run_id, exp
    tags = {**tr.context_tags(SOURCE), tr.ROLE: ROLE_HISTORY, MODEL_TAG: name,
            "mlflow.note.content": f"The verdict's axes of {name} over its versions (history.png), as numbers "
                                   "(history.csv, history.json) and as metrics history/<axis> by version (step)."}
    run = tr.retry(lambda: c.create_run(exp, tags=tags, run_name=f"history-{name}"))
    tr.terminate(c, run.info.run_id, "FINISHED", "finished")
    return run.info.run_id, exp


def _row_metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k.startswith(("exposure_auc.", "exposure_tpr.")) or k in ("membership_auc", "membership_tpr", "quality"):
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isnan(f):
                out[f"history/{k}"] = f
    return out


def log_history(c, run_id: str, files: list[Path], row: dict[str, Any] | None) -> None:
    """Rewrite the history run's files; log ``row`` (the version just audited) as metrics at its step."""
    for f in files:
        tr.retry(lambda f=f: c.log_artifact(run_id, str(f)))
    if row:
        tr.log_metrics(c, run_id, _row_metrics(row), step=int(row["version"]))
    tr.set_tags(c, run_id, {"tldr.history_updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
