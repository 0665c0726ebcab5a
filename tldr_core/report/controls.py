"""The controls table (Markdown) from the rows `python -m tldr_core.cli.controls` computed.

Renders only: every number comes from the rows (tldr_core.cli.controls.cell).
"""
from __future__ import annotations

from typing import Any

from tldr_core.scoring.risk import THRESHOLDS

COLUMNS = ("control", "attack", "expected", "verdict", "TPR@1%FPR [95% CI]", "AUC [95% CI]", "exposed",
           "matched@0.4 T / H'", "matched@0.6 T / H'", "gap [95% CI]", "quality", "train / test acc.", "steps", "time")


def _ci(m: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(m[key])} [{fmt.format(m[key + '_lo'])}, {fmt.format(m[key + '_hi'])}]"


def row_cells(r: dict[str, Any]) -> list[str]:
    m, c = r["metrics"], r["classifier"]
    verdict = f"**{r['risk']}** ({r['criterion']})" + (" — not as expected" if r["as_expected"] is False else "")
    return [r["control"], r["attack"], r["expected"], verdict, _ci(m, "exposure_tpr", "{:.3f}"), _ci(m, "exposure_auc"),
            f"{m['exposed_count']:.0f}", f"{m['matched_train_040']:.0f} / {m['matched_heldout_040']:.0f}",
            f"{m['matched_train_060']:.0f} / {m['matched_heldout_060']:.0f}",
            f"{m['gap']:+.3f} [{m['gap_ci_low']:+.3f}, {m['gap_ci_high']:+.3f}]", f"{m['quality']:.3f}",
            f"{c['train_accuracy']:.2f} / {c['test_accuracy']:.2f}", str(r.get("steps") or "-"),
            f"{r['seconds']:.0f} s"]


def canary_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r.get("canaries"):
            out.append(f"- {r['control']} x {r['attack']}: {r['canaries_exposed']} of {r['canaries']} canaries above "
                       f"the exposure threshold; their e(t) {r['canary_exposure']}, ranks among all training images "
                       f"{r['canary_ranks']} (1 = most exposed)")
    return out


def render_controls(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The whole table page: settings, the table, the canaries, the rule's thresholds."""
    lines = [f"Data set: {meta['dataset']}; TLDR {meta['tldr_steps']} generator steps (default loss weights); "
             f"KKT {meta['kkt_steps']} steps, settings {meta['kkt'] or 'defaults'}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    canaries = canary_lines(rows)
    if canaries:
        lines += ["", "Canaries:", *canaries]
    judged = [r for r in rows if r["as_expected"] is not None]
    wrong = [r for r in judged if not r["as_expected"]]
    lines += ["", f"{len(judged) - len(wrong)} of {len(judged)} attack cells as expected (the class-mean rows are "
                  f"a reference, not an attack: each class's mean training image scored as a reconstruction).",
              "", "Rule (tldr_core/scoring/risk.py), thresholds: "
              + ", ".join(f"{k} = {v:g}" for k, v in THRESHOLDS.items()) + "."]
    return "\n".join(lines) + "\n"
