"""The audit state a registered classifier version carries as model-version tags (`audit.status`,
`audit.time`, the scores and risk of its last audit, ...; the list is in `reaudit`'s docstring), and
how a finished search is written there as that version's audit (`record_search_audit`: a search,
a re-audit and `tldr audit --classifier models:/...` all leave the same tags).

The re-audit's whole verdict (`record_tags`: every axis, the criteria, key numbers; `comparison_tags`:
the comparison with the version it would replace) and the rule it was judged by (`rule_version`: the
promotion gate calls an audit under another rule stale) are written here too."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import best_trial, summarize_trials

STATUS, STARTED, TIME, ERROR, RUN_ID = "audit.status", "audit.started", "audit.time", "audit.error", "audit.run_id"
REQUEST_TAG, REQUESTED = "reaudit", "requested"
RULE_VERSION, SHA256, LINEAGE = "audit.rule_version", "audit.sha256", "audit.lineage"
REGRESSION, REGRESSION_AXES, COMPARED_WITH = "audit.regression", "audit.regression.axes", "audit.compared_with"
#: Removed when an audit writes results without them: a search's or `tldr audit`'s result on a version that
#: a re-audit had judged leaves no rule version or comparison behind, so the version is stale again.
RESULT_TAGS = ("audit.quality", "audit.gap", "audit.gap_ci_low", "audit.gap_ci_high", "audit.coverage",
               "audit.label_agreement", "audit.risk", "audit.risk_reason", RUN_ID, "audit.trial_run",
               "audit.generator", "audit.promotion", RULE_VERSION, SHA256, LINEAGE, REGRESSION, REGRESSION_AXES,
               COMPARED_WITH, "audit.membership", "audit.history_run", "audit.search_run")


#: Bumped by hand when the verdict's logic changes (rule_version() hashes the thresholds in itself).
#: 1: the search's best trial judged alone; 2: every attack + membership, compared with the version it replaces.
RULE_SERIES = "2"


def rule_version() -> str:
    """"<RULE_SERIES>-<8 hex>": the verdict rule and its thresholds (reconstruction, membership, the
    comparison's interval and FPR). An audit tagged with another value is stale."""
    from tldr_core.scoring import compare, membership_risk as mr, risk

    blob = json.dumps([risk.THRESHOLDS, risk.CRITERIA, mr.MEMBERSHIP_THRESHOLDS, mr.MEMBERSHIP_CRITERIA,
                       compare.LEVEL, compare.FPR], sort_keys=True)
    return f"{RULE_SERIES}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


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


# ------------------------------------------------------------------------------ the re-audit's verdict

def fmt(v: Any) -> str:
    """A number as a tag value ("nan" for NaN or missing)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "nan"
    return "nan" if math.isnan(f) else f"{f:.6g}"


def attack_metrics(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{attack kind: its metrics} of an audit record (metrics.json): the first attack, the others, the
    templates."""
    out = {record["attack"]: record.get("metrics", {})}
    out.update({k: v.get("metrics", {}) for k, v in (record.get("other_attacks") or {}).items()})
    if record.get("template_attack"):
        out["templates"] = record["template_attack"]
    return out


def _interval_tags(prefix: str, m: dict[str, Any], key: str) -> dict[str, str]:
    return {prefix: fmt(m.get(key)), f"{prefix}_lo": fmt(m.get(f"{key}_lo")), f"{prefix}_hi": fmt(m.get(f"{key}_hi"))}


def record_tags(record: dict[str, Any]) -> dict[str, str]:
    """Every axis of an audit's verdict as `audit.*` tags: the reconstruction level (`audit.risk`), its reason,
    criterion and attack, the membership level (`audit.membership`, "not run" when it did not run), the
    sentence, the worst attack's calibrated exposure AUC / TPR with intervals, each attack's, the membership
    attack's AUC / TPR, the first attack's quality / gap / coverage, and the stationarity residual when
    computed."""
    per = attack_metrics(record)
    top = per.get(record.get("risk_attack"), record.get("metrics", {}))
    verdict = record.get("verdict") or {}
    out = {"audit.risk": record["risk"], "audit.risk_reason": "; ".join(record.get("reasons", []))[:480],
           "audit.risk_attack": record.get("risk_attack", ""), "audit.criterion": record.get("criterion", ""),
           "audit.membership": verdict.get("membership", "not run"), "audit.verdict": verdict.get("sentence", "")[:480],
           "audit.attacks": ",".join(per)}
    out.update(_interval_tags("audit.exposure_auc", top, "exposure_auc"))
    out.update(_interval_tags("audit.exposure_tpr", top, "exposure_tpr"))
    for kind, m in per.items():
        if "exposure_auc" in m:
            out[f"audit.exposure_auc.{kind}"], out[f"audit.exposure_tpr.{kind}"] = fmt(m["exposure_auc"]), fmt(m["exposure_tpr"])
    m = record.get("metrics", {})
    for k in ("quality", "gap", "gap_ci_low", "gap_ci_high", "coverage", "label_agreement"):
        if m.get(k) is not None:
            out[f"audit.{k}"] = fmt(m[k])
    mem = record.get("membership")
    if mem:
        a, mm = mem["attack"], mem.get("metrics", {})
        out.update({"audit.membership_reason": "; ".join(mem.get("reasons", []))[:480],
                    "audit.membership_criterion": mem.get("criterion", ""), "audit.membership_attack": a})
        out.update(_interval_tags("audit.membership_auc", mm, f"mia_{a}_auc"))
        out.update(_interval_tags("audit.membership_tpr", mm, f"mia_{a}_tpr_1"))
    st = record.get("stationarity") or {}
    if st.get("computed"):
        out["audit.stationarity_residual"] = fmt(st.get("metrics", {}).get("stationarity_residual"))
    return out


def comparison_tags(cmp: dict[str, Any] | None, baseline: str | None, chosen: str) -> dict[str, str]:
    """The comparison with the version it would replace (Comparison.as_dict(), or None: nothing to compare
    with) as tags: `audit.regression` (true/false), `audit.regression.axes`, `audit.compared_with` (the
    baseline's URI or "none"), `audit.compared_by` (how it was chosen), `audit.lineage_match`, and per
    compared axis and statistic `audit.delta.<axis>.<stat>` with `_lo` / `_hi` (the 95 % paired interval)."""
    out = {COMPARED_WITH: baseline or "none", "audit.compared_by": chosen[:480]}
    if cmp is None:
        return {**out, REGRESSION: "false", REGRESSION_AXES: "", "audit.lineage_match": "n/a"}
    out.update({REGRESSION: str(cmp["regression"]).lower(), REGRESSION_AXES: ",".join(cmp["regressed_axes"]),
                "audit.lineage_match": str(cmp["paired"]).lower()})
    if cmp.get("note"):
        out["audit.comparison_note"] = cmp["note"][:480]
    for axis in cmp["axes"]:
        for stat, d in axis["differences"].items():
            key = f"audit.delta.{axis['axis']}.{stat}"
            out.update({key: fmt(d["delta"]), f"{key}_lo": fmt(d["ci_low"]), f"{key}_hi": fmt(d["ci_high"])})
    return out


def replace_audit_tags(c, cand: Candidate, tags: dict[str, Any]) -> None:
    """A finished re-audit's tags on a version: every earlier `audit.*` tag not in ``tags`` is removed
    (no stale delta or axis is left over), then ``tags`` with status done and the time."""
    keep = {STATUS, STARTED}
    now = dict(tr.retry(lambda: c.get_model_version(cand.name, cand.version)).tags or {})
    stale = [k for k in now if k.startswith("audit.") and k not in tags and k not in keep]
    delete_version_tags(c, cand, stale + [ERROR, REQUEST_TAG])
    set_version_tags(c, cand, {**tags, TIME: now_iso(), STATUS: "done"})
