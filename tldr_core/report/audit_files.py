"""An audit's files: metrics.json, report.html, membership.csv beside the attack's artefacts.

Presents an :class:`tldr_core.scoring.audit.AuditResults` and computes nothing: the verdict's two axes
are the scoring layer's (the reconstruction axis per attack, the membership axis, the sentence that
combines them). Used by ``tldr audit`` and the registry's re-audit, which then differ only in where the
folder goes (a staged --out, or an MLflow run's artifacts).

metrics.json: "risk", "reasons", "criterion", "thresholds" and "risk_attack" of the worst attack (the
reconstruction axis, as before), every attack under "risks", the model-free references under
"references", the membership axis under "membership" (level, reasons, metrics, notes on unresolved
numbers), the KKT premise under "stationarity", and "verdict": {"reconstruction", "membership",
"sentence"}.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tldr_core.attack.train import summarize_history
from tldr_core.report.artifacts import write_artifacts
from tldr_core.report.page import render_report
from tldr_core.scoring.audit import AuditResults, axis_levels, combined_sentence
from tldr_core.scoring.risk import Risk, assess

__all__ = ["MEMBERSHIP_CSV", "risk_fields", "audit_record", "write_audit_folder"]

MEMBERSHIP_CSV = "membership.csv"


def risk_fields(risk: Risk) -> dict[str, Any]:
    """One verdict as metrics.json records it."""
    return {"risk": risk.level, "reasons": list(risk.reasons), "criterion": risk.criterion,
            "thresholds": dict(risk.thresholds)}


def _dataset(bundle: Any) -> dict[str, Any]:
    return {"name": bundle.name, "source": bundle.source, "train_size": len(bundle.train),
            "heldout_size": len(bundle.heldout), "test_size": len(bundle.test),
            "population_size": len(bundle.test), "population": "the test split (disjoint from T and H')",
            "image_shape": list(bundle.image_shape), "num_classes": bundle.num_classes}


def _membership(res: AuditResults) -> dict[str, Any] | None:
    risk = res.membership_risk()
    if risk is None or res.membership is None:
        return None
    m = res.membership
    return {**risk_fields(risk), "attack": m.best, "reference_models": m.lira_k, "metrics": m.metrics(),
            "notes": m.notes()}


def _stationarity(res: AuditResults) -> dict[str, Any]:
    s = res.stationarity
    if s is None:
        return {"computed": False, "note": res.stationarity_note}
    return {"computed": True, "form": s.form, "sentence": s.sentence(), "metrics": s.metrics(),
            "per_layer": s.per_layer}


def audit_record(bundle: Any, res: AuditResults, classifier_info: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content (module doc)."""
    out = res.attack.out
    risks = res.risks()
    top, top_risk = res.reconstruction_risk()
    run_key = "generator" if out.kind == "tldr" else out.kind  # the attack's own run: steps and speed
    membership = _membership(res)
    record = {
        "attack": out.kind, "dataset": _dataset(bundle), "classifier": classifier_info, "settings": out.settings,
        "metrics": res.attack.metrics, "baselines": res.baselines, "final_losses": summarize_history(out.history),
        run_key: {"steps": out.steps, "seconds": round(out.seconds, 2),
                  "steps_per_second": round(out.steps_per_second, 2)},
        **risk_fields(top_risk), "risk_attack": top, "risks": {k: risk_fields(r) for k, r in risks.items()},
        "references": {name: {**risk_fields(assess(r.metrics, res.baselines)), "metrics": r.metrics}
                       for name, r in res.references.items()},
        "membership": membership, "stationarity": _stationarity(res),
        "verdict": {**axis_levels(res), "sentence": combined_sentence(top_risk, res.membership_risk())},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if res.templates is not None:
        record["template_attack"] = res.templates.summary()
    if res.others:  # further attacks (the re-audit's KKT): their files are in a sub-folder named by kind
        record["other_attacks"] = {k: {"metrics": s.metrics, "settings": s.out.settings if s.out else {},
                                       "steps": s.out.steps if s.out else 0, "folder": k}
                                   for k, s in res.others.items()}
    return record


def _json_default(v: Any) -> Any:
    return float(v)


def write_audit_folder(folder: str | Path, bundle: Any, res: AuditResults, classifier_info: dict[str, Any], *,
                       spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every file of an audit into ``folder`` (metrics.json last, so its presence means complete);
    returns the record written as metrics.json."""
    folder = Path(folder)
    write_artifacts(folder, bundle, res.attack, meta={"classifier": classifier_info.get("path")})
    if res.membership is not None:
        res.membership.write_csv(folder / MEMBERSHIP_CSV)
    for kind, scored in res.others.items():
        write_artifacts(folder / kind, bundle, scored, meta={"classifier": classifier_info.get("path")})
    record = audit_record(bundle, res, classifier_info)
    html = render_report(bundle, res.baselines, attack=res.attack, templates=res.templates, heldout=res.heldout,
                         spec=spec, record=record, references=res.references, membership=res.membership,
                         stationarity=res.stationarity, others=res.others)
    (folder / "report.html").write_text(html, encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, default=_json_default))
    return record
