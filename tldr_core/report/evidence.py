"""Report sections that put the verdict in context: the model-free references judged by the same rule.

Renders only (the references are scored by tldr_core.scoring.references): for each reference its
level, the criterion that set it, its calibrated and raw exposure beside the attack's, so a reader
sees how much of an attack's "exposure" an image that needs no model reaches too.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from tldr_core.report.html import COLOURS, esc
from tldr_core.scoring.references import REFERENCES, within_bound
from tldr_core.scoring.risk import Risk

REFERENCES_NOTE = ("Two images that need no model at all, scored and judged by the same rule as the attacks: each "
                   "class's mean training image (a statistic of T: on a small T it is closer to T than to unseen "
                   "images, so the rule may call it MEDIUM, never HIGH) and each class's mean population image "
                   "(knows nothing of T: the rule must call it LOW). An attack whose numbers do not beat these has "
                   "recovered class statistics, not training images.")


def _badge(level: str) -> str:
    return f'<span class="badge" style="background:{COLOURS[level]}">{level}</span>'


def _num(m: Mapping[str, float], key: str, spec: str) -> str:
    v = m.get(key, math.nan)
    return "&ndash;" if v is None or math.isnan(float(v)) else spec.format(v)


def _row(name: str, m: Mapping[str, float], risk: Risk, bound: str) -> str:
    cells = [_num(m, "exposure_tpr", "{:.1%}") + f" <small>[{_num(m, 'exposure_tpr_lo', '{:.1%}')}, "
             f"{_num(m, 'exposure_tpr_hi', '{:.1%}')}]</small>",
             _num(m, "raw_exposure_tpr", "{:.1%}"), _num(m, "exposure_auc", "{:.3f}"),
             f"{_num(m, 'exposed_count', '{:.0f}')} ({_num(m, 'exposed_distinct', '{:.0f}')})",
             f"{_num(m, 'matched_train_060', '{:.0f}')} / {_num(m, 'matched_heldout_060', '{:.0f}')}",
             _num(m, "gap", "{:+.3f}"), f"{_badge(risk.level)} <small>{esc(risk.criterion)}</small>", bound]
    return f"<tr><th>{esc(name)}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"


def references_section(attacks: list[tuple[str, Any]], risks: list[Risk],
                       references: Mapping[str, tuple[Any, Risk]]) -> list[str]:
    """The attacks and the references side by side: calibrated and raw TPR, AUC, exposed (distinct),
    matches at 0.6, gap and the level. ``references``: name -> (Scored, its Risk)."""
    head = ("", "calibrated TPR@1%FPR [95% CI]", "raw TPR", "calibrated AUC", "exposed (distinct)",
            "matched@0.6 T / H'", "gap", "level", "bound")
    rows = [_row(name, a.metrics, r, "") for (name, a), r in zip(attacks, risks)]
    for name, (scored, r) in references.items():
        bound = REFERENCES[name][1]
        ok = "within" if within_bound(name, r.level) else "<b>above its bound</b>"
        rows.append(_row(f"reference: {name}", scored.metrics, r, f"at most {bound} ({ok})"))
    table = ('<table class="metrics"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
             + "".join(rows) + "</table>")
    return ["<h2>Against references that need no model</h2>", f"<p class='note'>{REFERENCES_NOTE}</p>", table]
