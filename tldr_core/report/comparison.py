"""The re-audit's sections of a version's report: the side-by-side comparison with the version it would
replace, and the history of the registered model (its chart inline, and where the history run is).

Renders only: the comparison is computed by tldr_core.scoring.compare (its ``Comparison.as_dict()``,
plus who the baseline is), the history rows by the platform. :func:`insert_sections` puts the sections
into an audit's report.html before "How the risk level is decided" (the page's own sections stay as
tldr_core.report.page renders them).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from tldr_core.report.html import COLOURS, esc, fig_uri, figure_html

__all__ = ["comparison_section", "history_section", "insert_sections"]

ANCHOR = "<h2>How the risk level is decided</h2>"

AXIS_NAMES = {"exposure": "calibrated exposure", "membership": "membership score"}


def _num(v: Any, spec: str = "{:.3f}") -> str:
    return "&ndash;" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def _axis_label(axis: str) -> str:
    kind, _, attack = axis.partition(".")
    return f"{AXIS_NAMES.get(kind, kind)} ({attack})" if attack else AXIS_NAMES.get(kind, kind)


def _badge(level: str) -> str:
    colour = COLOURS.get(level)
    return f'<span class="badge" style="background:{colour}">{esc(level)}</span>' if colour else esc(level)


def _axes_table(axes: Sequence[dict[str, Any]]) -> str:
    rows = []
    for a in axes:
        for stat, d in a["differences"].items():
            what = "AUC, T vs H'" if stat == "auc" else "TPR at 1% FPR"
            flag = "<b>leakier</b>" if d["leakier"] else ("&ndash;" if d.get("note") else "no")
            ci = (f"[{_num(d['ci_low'], '{:+.3f}')}, {_num(d['ci_high'], '{:+.3f}')}]" if not d.get("note")
                  else f"<small>{esc(d['note'])}</small>")
            rows.append(f"<tr><th>{esc(_axis_label(a['axis']))}</th><td class='l'>{what}</td>"
                        f"<td>{_num(d['baseline'])}</td><td>{_num(d['candidate'])}</td>"
                        f"<td>{_num(d['delta'], '{:+.3f}')}</td><td>{ci}</td><td>{flag}</td></tr>")
    head = ("<tr><th>score</th><th>statistic</th><th>the version it would replace</th><th>this version</th>"
            "<th>difference</th><th>95% paired interval</th><th>regression</th></tr>")
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _levels_table(levels: dict[str, dict[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(axis)}</th><td>{_badge(v['baseline'])}</td><td>{_badge(v['candidate'])}</td></tr>"
                   for axis, v in levels.items())
    return ("<table class='kv'><tr><th>verdict axis</th><th>the version it would replace</th><th>this version</th>"
            f"</tr>{rows}</table>")


def comparison_section(cmp: dict[str, Any] | None, candidate: str, baseline: str | None, chosen: str) -> str:
    """The side-by-side section. ``cmp``: Comparison.as_dict() (None: nothing to compare with);
    ``candidate`` / ``baseline``: the versions (models:/ URIs); ``chosen``: how the baseline was chosen."""
    b = ["<h2>Compared with the version it would replace</h2>"]
    if cmp is None or baseline is None:
        return "".join(b + [f"<p class='note'>Not compared: {esc(chosen)}.</p>"])
    verdict = ("<b>Regression</b> on " + esc(", ".join(cmp["regressed_axes"])) if cmp["regression"]
               else "No regression")
    colour = COLOURS["HIGH"] if cmp["regression"] else COLOURS["LOW"]
    b.append(f"<p class='idline'>{esc(candidate)} against {esc(baseline)} ({esc(chosen)}). "
             f"<span style='color:{colour}'>{verdict}</span>: a regression is a difference whose 95% interval lies "
             "above 0 (this version separates its training images from unseen ones better), or a verdict level "
             "that rose.</p>")
    if cmp["paired"]:
        b.append("<p class='note'>Same data lineage: both versions were scored on the same training images T and "
                 "the same unseen images H'; each bootstrap draw resamples T and H' once, for both versions.</p>")
        b.append(_axes_table(cmp["axes"]))
    else:
        b.append(f"<p class='note'>Not paired ({esc(cmp['note'])}): only the verdict levels are compared.</p>")
    b.append(_levels_table(cmp["levels"]))
    return "".join(b)


def history_section(name: str, figure: Any | None, where: str, link: str | None = None) -> str:
    """The model's history: ``figure`` (a matplotlib figure, closed here) inline, and ``where`` the history
    run is (``link``: its URL in the MLflow UI, when known)."""
    b = [f"<h2>History of {esc(name)}</h2>"]
    if figure is not None:
        b.append(figure_html(fig_uri(figure), f"the verdict axes of {name} over its versions"))
    run = f"<a href='{esc(link)}'>{esc(where)}</a>" if link else esc(where)
    b.append(f"<p class='note'>The numbers (history.csv, history.json) and this chart (history.png) are artifacts "
             f"of the model's history run: {run}.</p>")
    return "".join(b)


def insert_sections(html: str, sections: Sequence[str]) -> str:
    """``html`` (an audit's report.html) with ``sections`` inserted before "How the risk level is decided"
    (before </body> when the page has no such section)."""
    block = "".join(sections)
    if ANCHOR in html:
        return html.replace(ANCHOR, block + ANCHOR, 1)
    return html.replace("</body>", block + "</body>", 1)
