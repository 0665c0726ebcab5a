"""The defence comparison's table, plot and page (`python -m tldr_core.cli.defence` computes the rows).

A row is one classifier variant: flat keys `<arch>_acc`, `<arch>_<attack>_<metric>`, `<arch>_<attack>_risk`,
`baseline_<name>_quality`, and private `_<arch>_<attack>` entries holding the scored results (images for
the montages; never written to the table).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from tldr_core.report.html import COLOURS, esc, kv_table, page, verdict_html
from tldr_core.report.page import thresholds_html
from tldr_core.scoring.risk import LEVELS, THRESHOLDS

MEDIUM_GAP_CI_LOW = THRESHOLDS["medium_gap_ci_low"]

ATTACK_LABEL = {"templates": "weight templates", "generator": "generator"}


def attack_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(arch, attack) pairs present in the rows, in a stable order."""
    seen = []
    for r in rows:
        for k in r:
            if k.endswith("_quality_heldout") and not k.startswith("baseline"):
                arch, attack = k[: -len("_quality_heldout")].split("_", 1)
                if (arch, attack) not in seen:
                    seen.append((arch, attack))
    return seen


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    flat = table_rows(rows)
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in flat:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _table(rows: list[dict[str, Any]], html: bool) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (markdown text or HTML cell contents)."""
    cols = attack_columns(rows)
    archs = list(dict.fromkeys(a for a, _ in cols))
    head = ["variant", "what changed", "T"] + [f"{a} test acc" for a in archs]
    for a, k in cols:
        head += [f"{ATTACK_LABEL[k]} ({a}): quality", "gap [95% CI]", "risk"]
    e = esc if html else str
    body = []
    for r in rows:
        cells = [f"<b>{e(r['variant'])}</b>" if html else r["variant"], e(r["change"]), str(r["train_size"])]
        cells += [f"{r.get(a + '_acc', math.nan):.3f}" for a in archs]
        for a, k in cols:
            p = f"{a}_{k}"
            if p + "_quality" not in r:
                cells += ["n/a"] * 3
                continue
            ci = f"[{r[p + '_gap_ci_low']:+.3f}, {r[p + '_gap_ci_high']:+.3f}]"
            lvl, la = r[p + "_risk"], r.get(p + "_label_agreement", 1.0)
            note = f" (label agreement {la:.2f}: did not converge)" if la < 0.8 else ""
            cells += [f"{r[p + '_quality']:.3f}", f"{r[p + '_gap']:+.3f} " + (f"<small>{ci}</small>" if html else ci),
                      (f"<span class='badge' style='background:{COLOURS[lvl]}'>{lvl}</span>" if html else lvl) + note]
        body.append(cells)
    return head, body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head, body = _table(rows, html=False)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict[str, Any]]) -> str:
    head, body = _table(rows, html=True)
    trs = "".join("<tr>" + "".join(f"<td{' class=l' if i < 2 else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>"
                  for cells in body)
    return "<table class='metrics'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + f"</tr>{trs}</table>"


def plot(rows: list[dict[str, Any]]) -> Any:
    """Leakage (quality, gap with 95% CI) against test accuracy: one row of panels per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = attack_columns(rows)
    fig, axes = plt.subplots(len(cols), 2, figsize=(11, 3.6 * len(cols)), squeeze=False)
    for i, (arch, attack) in enumerate(cols):
        p = f"{arch}_{attack}"
        pts = [r for r in rows if p + "_quality" in r]
        acc = [r[f"{arch}_acc"] for r in pts]
        for j, (key, what) in enumerate((("quality", "quality (SSIM to nearest training image)"),
                                         ("gap", "memorisation gap (95% CI)"))):
            ax = axes[i][j]
            y = [r[f"{p}_{key}"] for r in pts]
            if key == "gap":
                err = [[r[p + "_gap"] - r[p + "_gap_ci_low"] for r in pts], [r[p + "_gap_ci_high"] - r[p + "_gap"]
                                                                             for r in pts]]
                ax.errorbar(acc, y, yerr=err, fmt="none", ecolor="#999", capsize=3, zorder=1)
                ax.axhline(0, color="#444", lw=0.8)
            else:
                b = pts[0]
                ax.axhline(b["baseline_class_mean_quality"], color="tab:green", ls="--", lw=1,
                           label=f"class-mean image ({b['variant']})")
                ax.axhline(b["baseline_noise_quality"], color="tab:gray", ls=":", lw=1, label="uniform noise")
                ax.legend(fontsize=7, loc="best")
            colours = [COLOURS[r[p + "_risk"]] for r in pts]
            ax.scatter(acc, y, c=colours, s=36, zorder=2, edgecolors="k", linewidths=0.5)
            for r, xv, yv in zip(pts, acc, y):
                ax.annotate(r["variant"], (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=7.5)
            ax.set_xlabel(f"{arch} test accuracy")
            ax.set_ylabel(what, fontsize=8.5)
            ax.set_title(f"{ATTACK_LABEL[attack]} on {arch}", fontsize=9.5)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], marker="o", ls="", color=c, markeredgecolor="k", label=f"{lvl} risk")
                        for lvl, c in COLOURS.items()], loc="upper right", fontsize=8, ncol=3)
    fig.suptitle("Leakage against test accuracy (further down = leaks less; right = more accurate)", fontsize=10,
                 x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def summary(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(worst risk level, one sentence per attack: which variant leaks least among the accurate ones)."""
    parts, levels = [], []
    for arch, attack in attack_columns(rows):
        p = f"{arch}_{attack}"
        pts = [r for r in rows if p + "_quality" in r]
        best_acc = max(r[f"{arch}_acc"] for r in pts)
        ok = [r for r in pts if r[f"{arch}_acc"] >= best_acc - 0.01]
        least = min(ok, key=lambda r: (r[p + "_gap_ci_low"] > MEDIUM_GAP_CI_LOW, r[p + "_quality"]))
        sig = [r["variant"] for r in pts if r[p + "_gap_ci_low"] > MEDIUM_GAP_CI_LOW]
        levels += [r[p + "_risk"] for r in pts]
        parts.append(f"{ATTACK_LABEL[attack].capitalize()} on {arch}: the gap is significant (CI above "
                     f"{MEDIUM_GAP_CI_LOW}) for {', '.join(sig) if sig else 'no variant'}; of the variants within 0.01 "
                     f"of the best test "
                     f"accuracy ({best_acc:.3f}), {least['variant']} leaks least (quality {least[p + '_quality']:.3f}, "
                     f"gap {least[p + '_gap']:+.3f}).")
    level = max(levels, key=LEVELS.index) if levels else "LOW"
    return level, parts


def render_defence_report(rows: list[dict[str, Any]], settings: dict[str, Any], figures: dict[str, str]) -> str:
    level, items = summary(rows)
    headline = {"HIGH": "some variants give away training images", "MEDIUM": "some variants leak measurably",
                "LOW": "no variant leaks measurably"}[level]
    b = [f"<h1>TLDR defence comparison: {esc(settings['dataset'])}</h1>",
         "<p class='idline'>Classifier variants that differ from the base in one training choice, each attacked "
         "with the same settings. Which setting leaks least for the accuracy you need?</p>",
         verdict_html(level, headline, "The worst variant sets the level; per attack:", items),
         "<h2>Leakage against test accuracy</h2>",
         f"<img src='{figures['plot']}' alt='leakage against test accuracy' style='max-width:100%'>",
         "<h2>Table</h2>", html_table(rows)]
    for key, title in (("templates", "What came out: weight templates of each variant"),
                       ("generator", "What came out: each variant's best generator reconstruction per class")):
        if key in figures:
            b += [f"<h2>{title}</h2>", f"<img src='{figures[key]}' alt='{esc(title)}' style='max-width:100%'>"]
    b += ["<h2>How the risk level is decided</h2>", thresholds_html(settings["tau"]),
          "<h2>Settings that reproduce this</h2>", f"<pre>{esc(settings['command'])}</pre>",
          kv_table({k: v for k, v in settings.items() if k != "command"})]
    return page(f"TLDR defence comparison: {settings['dataset']}", "".join(b))
