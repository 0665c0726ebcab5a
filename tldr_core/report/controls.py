"""The controls table (Markdown) from the rows `python -m tldr_core.cli.controls` computed.

Renders only: every number comes from the rows (tldr_core.cli.controls.cell). Columns whose keys no
row carries (the membership axis, the stationarity residual) are left out.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from tldr_core.scoring.risk import THRESHOLDS

Row = dict[str, Any]


def _ci(m: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    if key not in m:
        return "-"
    return f"{fmt.format(m[key])} [{fmt.format(m[key + '_lo'])}, {fmt.format(m[key + '_hi'])}]"


def _verdict(r: Row) -> str:
    return f"**{r['risk']}** ({r['criterion']})" + (" — not as expected" if r["as_expected"] is False else "")


def _matched(m: dict[str, Any], tag: str) -> str:
    p = m.get(f"matched_p_{tag}", math.nan)
    return f"{m[f'matched_train_{tag}']:.0f} / {m[f'matched_heldout_{tag}']:.0f}" + (
        f" (p {p:.2g})" if not math.isnan(p) else "")


def _membership(r: Row) -> str:
    """The control's membership axis (the same on every row of a control): level, attack, TPR at 1 % FPR."""
    mb = r.get("membership")
    if not mb:
        return "-"
    p = f"mia_{mb['attack']}_"
    return f"**{mb['risk']}** ({mb['attack']}) {_ci(mb['metrics'], p + 'tpr_1', '{:.3f}')}"


def _residual(r: Row) -> str:
    v = r.get("classifier", {}).get("stationarity_residual")
    form = r.get("classifier", {}).get("stationarity_form")
    return "-" if v is None else f"{v:.3g}" + (" (no wd)" if form == "margin" else "")


def _train_cost(r: Row) -> str:
    s = r.get("classifier", {}).get("train_seconds")
    return "-" if s is None else f"{s:.0f} s"


#: (header, cell) in table order; the optional ones are shown only when some row has their data.
COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("control", lambda r: r["control"]),
    ("attack", lambda r: r["attack"]),
    ("expected", lambda r: r["expected"]),
    ("verdict", _verdict),
    ("calibrated TPR@1%FPR [95% CI]", lambda r: _ci(r["metrics"], "exposure_tpr", "{:.3f}")),
    ("raw TPR@1%FPR [95% CI]", lambda r: _ci(r["metrics"], "raw_exposure_tpr", "{:.3f}")),
    ("calibrated AUC [95% CI]", lambda r: _ci(r["metrics"], "exposure_auc")),
    ("exposed (distinct / chance)", lambda r: f"{r['metrics']['exposed_count']:.0f} "
                                              f"({r['metrics'].get('exposed_distinct', math.nan):.0f} / "
                                              f"{r['metrics'].get('exposed_by_chance', math.nan):.0f})"),
    ("matched@0.4 T / H'", lambda r: _matched(r["metrics"], "040")),
    ("matched@0.6 T / H'", lambda r: _matched(r["metrics"], "060")),
    ("gap [95% CI]", lambda r: f"{r['metrics']['gap']:+.3f} [{r['metrics']['gap_ci_low']:+.3f}, "
                               f"{r['metrics']['gap_ci_high']:+.3f}]"),
    ("quality", lambda r: f"{r['metrics']['quality']:.3f}"),
    ("membership", _membership),
    ("stationarity residual", _residual),
    ("train / test acc.", lambda r: f"{r['classifier']['train_accuracy']:.2f} / {r['classifier']['test_accuracy']:.2f}"),
    ("training", _train_cost),
    ("steps", lambda r: str(r.get("steps") or "-")),
    ("time", lambda r: f"{r['seconds']:.0f} s"),
]
_OPTIONAL = {"membership", "stationarity residual", "training"}


def columns(rows: list[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    """The columns to show: every fixed one, and an optional one when some row fills it."""
    return [(h, f) for h, f in COLUMNS if h not in _OPTIONAL or any(f(r) != "-" for r in rows)]


def row_cells(r: Row, cols: list[tuple[str, Callable[[Row], str]]] | None = None) -> list[str]:
    return [f(r) for _, f in (cols if cols is not None else COLUMNS)]


def canary_lines(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.get("canaries"):
            line = (f"- {r['control']} x {r['attack']}: {r['canaries_exposed']} of {r['canaries']} canaries above "
                    f"the exposure threshold; their calibrated e(t) {r['canary_exposure']}, reconstruction ranks "
                    f"among all training images {r['canary_ranks']} (1 = most exposed)")
            if r.get("canary_membership_ranks"):
                line += f"; membership ranks {r['canary_membership_ranks']}"
            out.append(line)
    return out


def render_controls(rows: list[Row], meta: dict[str, Any]) -> str:
    """The whole table page: settings, the table, the canaries, the rule's thresholds."""
    cols = columns(rows)
    lines = [f"Data set: {meta['dataset']}; TLDR {meta['tldr_steps']} generator steps (default loss weights); "
             f"KKT {meta['kkt_steps']} steps, settings {meta['kkt'] or 'defaults'}.", "",
             "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row_cells(r, cols)) + " |" for r in rows]
    canaries = canary_lines(rows)
    if canaries:
        lines += ["", "Canaries:", *canaries]
    attacks = [r for r in rows if not r.get("reference")]
    refs = [r for r in rows if r.get("reference")]
    wrong = [r for r in attacks if r["as_expected"] is False]
    refs_wrong = [r for r in refs if r["as_expected"] is False]
    lines += ["", f"{len(attacks) - len(wrong)} of {len(attacks)} attack cells as expected; {len(refs) - len(refs_wrong)}"
                  f" of {len(refs)} model-free reference cells within their bound (class mean of T at most MEDIUM, "
                  f"class mean of P LOW).",
              "", "Rule (tldr_core/scoring/risk.py), thresholds: "
              + ", ".join(f"{k} = {v:g}" for k, v in THRESHOLDS.items()) + "."]
    return "\n".join(lines) + "\n"
