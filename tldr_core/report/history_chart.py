"""The history of one registered classifier: its verdict axes over its versions, as a chart (history.png)
and as numbers (history.csv, history.json), drawn from one row per audited version.

A row (built by the platform from the versions' ``audit.*`` tags) is a flat dict: ``version`` (int),
``reconstruction`` and ``membership`` (the verdict levels), ``regression`` ("true" / "false" / ""),
``compared_with``, ``champion`` (bool), ``quality``, ``membership_auc``, ``membership_tpr`` and, per
attack, ``exposure_auc.<attack>`` / ``exposure_tpr.<attack>`` (floats; missing: NaN). Three panels share
the version axis: the calibrated exposure (AUC solid, TPR at 1 % FPR dashed, per attack), the membership
score (AUC, TPR), and the reconstructions' quality; each point is coloured by its verdict level, a
regression is ringed in red, the champion starred.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # names come from the registry: "$x$" stays text
import matplotlib.pyplot as plt  # noqa: E402

from tldr_core.report.html import COLOURS  # noqa: E402

__all__ = ["history_figure", "write_history", "HISTORY_FILES"]

HISTORY_FILES = ("history.png", "history.csv", "history.json")
FIXED = ("version", "reconstruction", "membership", "regression", "compared_with", "champion", "quality",
         "membership_auc", "membership_tpr")


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _attacks(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k.split(".", 1)[1] for r in rows for k in r if k.startswith("exposure_auc.")})


def _series(ax: Any, rows: Sequence[dict[str, Any]], key: str, level_key: str, label: str, style: str) -> None:
    xs = [r["version"] for r in rows]
    ys = [_f(r.get(key)) for r in rows]
    if all(math.isnan(y) for y in ys):
        return
    line, = ax.plot(xs, ys, style, label=label, zorder=2)
    for x, y, r in zip(xs, ys, rows):
        if math.isnan(y):
            continue
        ax.scatter([x], [y], s=46, color=COLOURS.get(r.get(level_key), "#888"), edgecolor=line.get_color(), zorder=3)
        if str(r.get("regression")) == "true":
            ax.scatter([x], [y], s=190, facecolors="none", edgecolors=COLOURS["HIGH"], linewidths=2, zorder=4)
        if r.get("champion"):
            ax.scatter([x], [y], s=110, marker="*", color="#f2c200", edgecolor="k", linewidths=0.5, zorder=5)


def _tick(r: dict[str, Any]) -> str:
    """The version's x label: its number, both verdict levels, a regression and the champion."""
    lines = [f"v{r['version']}" + (" (champion)" if r.get("champion") else ""),
             f"rec. {r.get('reconstruction') or '-'}", f"mem. {r.get('membership') or '-'}"]
    if str(r.get("regression")) == "true":
        lines.append("REGRESSION")
    return "\n".join(lines)


def history_figure(rows: Sequence[dict[str, Any]], name: str) -> Any:
    """The chart (a matplotlib figure) of ``rows`` (sorted by version)."""
    rows = sorted(rows, key=lambda r: int(r["version"]))
    fig, axes = plt.subplots(3, 1, figsize=(9.5, 8.2), sharex=True)
    ax = axes[0]
    for attack in _attacks(rows):
        _series(ax, rows, f"exposure_auc.{attack}", "reconstruction", f"{attack}: AUC", "-o")
        _series(ax, rows, f"exposure_tpr.{attack}", "reconstruction", f"{attack}: TPR at 1% FPR", "--o")
    ax.set_ylabel("calibrated exposure")
    ax.set_title("reconstruction axis: calibrated exposure per attack (point colour: the axis' level)", fontsize=9,
                 loc="left")
    _series(axes[1], rows, "membership_auc", "membership", "AUC", "-o")
    _series(axes[1], rows, "membership_tpr", "membership", "TPR at 1% FPR", "--o")
    axes[1].set_ylabel("membership score")
    axes[1].set_title("membership axis: the strongest membership attack (point colour: the axis' level)", fontsize=9,
                      loc="left")
    for a in axes[:2]:  # chance: AUC 0.5, TPR = FPR = 1 %
        a.axhline(0.5, color="#999", lw=0.8, ls=":")
        a.axhline(0.01, color="#999", lw=0.8, ls=":")
    _series(axes[2], rows, "quality", "reconstruction", "quality (mean SSIM to T)", "-o")
    axes[2].set_ylabel("quality")
    axes[2].set_xticks([int(r["version"]) for r in rows], [_tick(r) for r in rows], fontsize=8)
    axes[2].set_xlim(min(r["version"] for r in rows) - 0.5, max(r["version"] for r in rows) + 0.5)
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{name}: the verdict's axes over its registered versions\nred ring: a regression against the "
                 "version it would replace; star: the champion; dotted: chance (AUC 0.5, TPR 1%)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def write_history(folder: str | Path, rows: Sequence[dict[str, Any]], name: str) -> list[Path]:
    """history.png, history.csv and history.json of ``rows`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: int(r["version"]))
    fig = history_figure(rows, name)
    fig.savefig(folder / HISTORY_FILES[0], dpi=100)
    plt.close(fig)
    cols = list(FIXED) + sorted({k for r in rows for k in r} - set(FIXED))
    with (folder / HISTORY_FILES[1]).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in cols} for r in rows])
    (folder / HISTORY_FILES[2]).write_text(json.dumps({"model": name, "versions": rows}, indent=1, default=str))
    return [folder / n for n in HISTORY_FILES]
