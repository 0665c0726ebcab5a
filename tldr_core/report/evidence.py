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


MEMBERSHIP_NOTE = ("<b>Membership inference</b> asks the classifier alone whether an image was in its training set: "
                   "the loss and logit-margin thresholds (Yeom et al. 2018), and offline LiRA (Carlini et al. 2022): "
                   "the model's margin on each image against a Gaussian fitted to the margins of reference models "
                   "trained on population images only, so an image that is easy for any model is not taken for a "
                   "member. TPR at a fixed FPR on T against as many unseen images (H'); chance is TPR = FPR. "
                   "membership.csv lists every image with its score and rank.")


def _mia_row(name: str, m: Mapping[str, float], prefix: str) -> str:
    tpr = lambda tag: (f"{_num(m, f'{prefix}tpr_{tag}', '{:.1%}')} <small>[{_num(m, f'{prefix}tpr_{tag}_lo', '{:.1%}')}, "  # noqa: E731
                       f"{_num(m, f'{prefix}tpr_{tag}_hi', '{:.1%}')}]</small>")
    cells = [f"{_num(m, prefix + 'auc', '{:.3f}')} <small>[{_num(m, prefix + 'auc_lo', '{:.3f}')}, "
             f"{_num(m, prefix + 'auc_hi', '{:.3f}')}]</small>", tpr("1"), tpr("01")]
    return f"<tr><th>{esc(name)}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"


def membership_section(membership: Any, risk: Risk) -> list[str]:
    """The membership axis: its level and reason, one row per attack run (AUC, TPR at 1 % and 0.1 % FPR with
    95 % intervals) and why a number is missing (an FPR that H' cannot resolve)."""
    m = membership.metrics()
    names = {"loss": "loss threshold", "margin": "logit margin",
             "lira": f"offline LiRA ({membership.lira_k} reference models)"}
    rows = [_mia_row(label, m, f"mia_{key}_") for key, label in names.items() if f"mia_{key}_auc" in m]
    table = ('<table class="metrics"><tr><th></th><th>AUC [95% CI]</th><th>TPR at 1% FPR</th>'
             "<th>TPR at 0.1% FPR</th></tr>" + "".join(rows) + "</table>")
    notes = sorted(set(membership.notes().values()))
    return ["<h2>Membership: can the model tell its training images from unseen ones?</h2>",
            f"<p>{_badge(risk.level)} {esc(risk.reason)}</p>", f"<p class='note'>{MEMBERSHIP_NOTE}</p>", table,
            *(f"<p class='note'>Not measured: {esc(n)}.</p>" for n in notes)]


def stationarity_section(stat: Any, note: str = "") -> list[str]:
    """One paragraph: how well the KKT attack's premise holds on T (tldr_core.scoring.stationarity)."""
    if stat is None:
        return ["<h3>The KKT attack's premise</h3>", f"<p class='note'>{esc(note or 'not computed')}</p>"]
    layers = ", ".join(f"{esc(k)} {v:.3g}" for k, v in stat.per_layer.items())
    return ["<h3>The KKT attack's premise</h3>",
            f"<p>{esc(stat.sentence())} Per layer: {layers}. A residual near 0 means the weights are the weighted "
            "sum of training-image gradients the stationarity attack solves for; far from 0, that attack's "
            "equation does not hold for this model and its failure says little.</p>"]
