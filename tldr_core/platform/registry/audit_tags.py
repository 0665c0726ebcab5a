"""The audit state a registered classifier version carries as model-version tags (`audit.status`,
`audit.time`, the scores and risk of its last audit, ...; the list is in `reaudit`'s docstring), and
how a finished search is written there as that version's audit (`record_search_audit`: a search,
a re-audit and `tldr audit --classifier models:/...` all leave the same tags)."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import best_trial, summarize_trials

STATUS, STARTED, TIME, ERROR, RUN_ID = "audit.status", "audit.started", "audit.time", "audit.error", "audit.run_id"
REQUEST_TAG, REQUESTED = "reaudit", "requested"
RESULT_TAGS = ("audit.quality", "audit.gap", "audit.gap_ci_low", "audit.gap_ci_high", "audit.coverage",
               "audit.label_agreement", "audit.risk", "audit.risk_reason", RUN_ID, "audit.trial_run",
               "audit.generator", "audit.promotion")


class ReauditError(RuntimeError):
    """A problem with the re-audit as a whole (printed as one line)."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def parse_iso(s: str | None) -> _dt.datetime | None:
    if not s:
        return None
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def one_line(exc: BaseException | str, limit: int = 480) -> str:
    s = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    s = " ".join(s.split())
    return s[:limit]


@dataclass
class Candidate:
    """A registered classifier version, its data set, why it is audited and its tags."""

    name: str
    version: str
    dataset: str
    reason: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def set_version_tags(c, mv: Candidate, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        tr.retry(lambda k=k, v=v: c.set_model_version_tag(mv.name, mv.version, k, str(v)))


def delete_version_tags(c, mv: Candidate, keys) -> None:
    from mlflow.exceptions import MlflowException

    for k in keys:
        try:
            c.delete_model_version_tag(mv.name, mv.version, k)
        except MlflowException:
            pass  # not there


def audit_results(c, search_run_id: str) -> dict[str, Any]:
    """The best trial's metrics of a finished search, its risk level and its promotion outcome."""
    import mlflow

    from tldr_core.scoring.risk import assess

    parent = tr.retry(lambda: c.get_run(search_run_id))
    objective = parent.data.tags.get(tr.OBJECTIVE, "quality")
    best = best_trial(summarize_trials(c, parent.info.experiment_id, search_run_id, objective))
    if best is None:
        raise ReauditError(f"search run {search_run_id}: no trial finished")
    m = tr.scores_of(tr.retry(lambda: c.get_run(best.run_id)).data.metrics)
    mlflow.set_tracking_uri(c.tracking_uri)
    baselines = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/summary/baselines.json")
    missing = [k for k in ("quality", "gap", "gap_ci_low", "gap_ci_high", "gap_significant", "coverage") if k not in m]
    if missing:
        raise ReauditError(f"trial run {best.run_id} lacks metrics {missing}")
    risk = assess({**m, "tau": m.get("tau", 0.5)}, baselines)
    t = tr.retry(lambda: c.get_run(search_run_id)).data.tags
    out = {"audit.quality": f"{m['quality']:.6g}", "audit.gap": f"{m['gap']:.6g}",
           "audit.gap_ci_low": f"{m['gap_ci_low']:.6g}", "audit.gap_ci_high": f"{m['gap_ci_high']:.6g}",
           "audit.coverage": f"{m['coverage']:.6g}", "audit.risk": risk.level, "audit.risk_reason": risk.reason[:480],
           RUN_ID: search_run_id, "audit.trial_run": best.run_id}
    if m.get("label_agreement") is not None:
        out["audit.label_agreement"] = f"{m['label_agreement']:.6g}"
    if t.get("tldr.generator_version"):
        out["audit.generator"] = f"models:/{t.get('tldr.generator_model')}/{t['tldr.generator_version']}"
    if t.get("tldr.promotion"):
        out["audit.promotion"] = t["tldr.promotion"][:480]
    return out


def record_search_audit(c, search_run_id: str, name: str, version: str) -> dict[str, Any] | None:
    """Write a finished search's result onto the classifier version it attacked (audit.status=done,
    audit.time, the scores and risk of `audit_results`), so a search counts as that version's audit
    (`re-audit --dry-run` no longer lists it). Never fails the search: returns None when it could not."""
    try:
        results = audit_results(c, search_run_id)
        set_audit_tags(c, Candidate(name, str(version), "", "search"), results)
        return results
    except Exception:  # noqa: BLE001 - the search itself succeeded; the next re-audit will redo this
        return None


def set_audit_tags(c, cand: Candidate, results: dict[str, Any]) -> None:
    """A finished audit's `audit.*` results on a classifier version: status done, the time, no stale
    result, error or re-audit request left over."""
    delete_version_tags(c, cand, [k for k in RESULT_TAGS if k not in results] + [ERROR, REQUEST_TAG])
    set_version_tags(c, cand, {**results, TIME: now_iso(), STATUS: "done"})
