"""HTML building blocks of the audit reports: images as PNG data URIs, image grids, image pairs with
their SSIM, tables, the page shell and its stylesheet. Everything is inline: a page needs no network.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

COLOURS = {"LOW": "#1b7f3b", "MEDIUM": "#b86e00", "HIGH": "#b3261e"}
MAX_CLASSES_SHOWN = 20
esc = html.escape


# ------------------------------------------------------------------------------------------- images

def img_uri(img: torch.Tensor, target: int = 56) -> str:
    """(C, H, W) in [0, 1] -> PNG data URI, upscaled (nearest) so the short side is about `target` px."""
    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    im = Image.fromarray(a)
    s = max(1, round(target / min(im.size)))
    if s > 1:
        im = im.resize((im.size[0] * s, im.size[1] * s), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return _uri(buf)


def fig_uri(fig: Any) -> str:
    """A matplotlib figure -> PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _uri(buf)


def _uri(buf: io.BytesIO) -> str:
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(img: torch.Tensor, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{img_uri(img)}" alt="{esc(alt)}">{cap}</figure>'


def _name(class_names: Sequence[str], c: int) -> str:
    return str(class_names[c]) if c < len(class_names) else str(c)


def grid_html(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], per_row: int = 10) -> str:
    rows = []
    for c in sorted(set(labels.tolist()))[:MAX_CLASSES_SHOWN]:
        idx = (labels == c).nonzero().flatten()[:per_row].tolist()
        cells = "".join(_img(images[i], f"reconstruction of class {_name(class_names, c)}") for i in idx)
        rows.append(f'<div class="row"><div class="cls">{esc(_name(class_names, c))}</div>{cells}</div>')
    return "".join(rows)


def pairs_html(images: torch.Tensor, labels: torch.Tensor, refs: torch.Tensor, scores: torch.Tensor,
               class_names: Sequence[str], left: str, right: str, per_class: int = 2,
               extra: torch.Tensor | None = None, extra_name: str = "") -> str:
    """Per class, the `per_class` best-matching images beside their reference image, SSIM underneath."""
    cards = []
    for c in sorted(set(labels.tolist()))[:MAX_CLASSES_SHOWN]:
        idx = (labels == c).nonzero().flatten()
        for i in idx[torch.argsort(scores[idx], descending=True)][:per_class].tolist():
            cn = _name(class_names, c)
            figs = _img(images[i], f"{left}, class {cn}", left) + _img(refs[i], f"{right}, class {cn}", right)
            if extra is not None:
                figs += _img(extra[i], f"{extra_name}, class {cn}", extra_name)
            cards.append(f'<div class="pair"><div class="pc">class {esc(cn)} &middot; SSIM '
                         f'<b>{float(scores[i]):.2f}</b></div><div class="figs">{figs}</div></div>')
    return f'<div class="pairs">{"".join(cards)}</div>'


# ------------------------------------------------------------------------------------------- tables

TABLE_COLS = [("quality", "quality vs T", "{:.3f}"), ("quality_heldout", "quality vs H'", "{:.3f}"),
              ("gap", "gap", "{:+.3f}"), ("coverage", "coverage@tau", "{:.3f}"),
              ("label_agreement", "label agreement", "{:.2f}"), ("diversity", "diversity", "{:.3f}"),
              ("n_recon", "n", "{:.0f}")]


def _fmt(m: dict[str, Any], key: str, spec: str) -> str:
    v = m.get(key, math.nan)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "&ndash;"
    if key == "gap":
        return f"{v:+.3f} <small>[{m['gap_ci_low']:+.3f}, {m['gap_ci_high']:+.3f}]</small>"
    return spec.format(v)


def metrics_table(rows: Sequence[tuple[str, dict[str, float], str]]) -> str:
    """rows: (name, metrics dict, risk level or '') -> an HTML table."""
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in TABLE_COLS)
    body = []
    for name, m, level in rows:
        risk = f'<span class="badge" style="background:{COLOURS[level]}">{level}</span>' if level else "baseline"
        cells = "".join(f"<td>{_fmt(m, k, s)}</td>" for k, _, s in TABLE_COLS)
        body.append(f"<tr><th>{esc(name)}</th>{cells}<td>{risk}</td></tr>")
    return f'<table class="metrics"><tr><th></th>{head}<th>risk</th></tr>{"".join(body)}</table>'


def _ci(m: dict[str, Any], key: str, spec: str) -> tuple[str, str]:
    """(value, "[lo, hi]") of ``key`` and its ``_lo``/``_hi`` interval, formatted with ``spec``."""
    return spec.format(m[key]), f"{spec.format(m[key + '_lo'])} &ndash; {spec.format(m[key + '_hi'])}"


def exposure_table(m: dict[str, Any], train_size: int) -> str:
    """The exposure summary of one attack's metrics (the keys of scoring.exposure_score): the calibrated
    exposure's AUC and TPR at the FPR with their 95% intervals and chance levels, the exposed count with
    how many are expected by chance, the raw exposure's line, the one-to-one matches of reconstructions
    to training images (T) and to as many unseen images (H') at each SSIM bar with Fisher's p-value."""
    fpr = float(m.get("exposure_fpr", 0.01))
    auc, auc_ci = _ci(m, "exposure_auc", "{:.3f}")
    tpr, tpr_ci = _ci(m, "exposure_tpr", "{:.1%}")
    chance = m.get("exposed_by_chance", fpr * train_size)
    rows = [("calibrated exposure AUC, training vs unseen images", auc, auc_ci, "0.5"),
            (f"TPR at {fpr:.0%} FPR (training images exposed)", tpr, tpr_ci, f"{fpr:.0%}"),
            ("exposed training images", f"{m['exposed_count']:.0f} of {train_size} (e_cal(t) &gt; "
             f"{m['exposure_threshold']:.3f}); {m.get('exposed_distinct', math.nan):.0f} with a reconstruction of "
             "their own", "", f"about {chance:.3g} expected by chance")]
    if "raw_exposure_auc" in m:
        r_auc, r_auc_ci = _ci(m, "raw_exposure_auc", "{:.3f}")
        r_tpr, r_tpr_ci = _ci(m, "raw_exposure_tpr", "{:.1%}")
        rows.append((f"raw exposure (best SSIM, uncalibrated): AUC {r_auc} [{r_auc_ci}], TPR", r_tpr, r_tpr_ci,
                     f"{m['raw_exposed_count']:.0f} exposed"))
    for key in sorted(k for k in m if k.startswith("matched_train_")):
        tag = key[len("matched_train_"):]
        held, p = m.get(f"matched_heldout_{tag}", math.nan), m.get(f"matched_p_{tag}", math.nan)
        rows.append((f"one-to-one matches at SSIM &ge; {int(tag) / 100:.1f}", f"{m[key]:.0f} training images",
                     f"Fisher p = {p:.2g}", f"{held:.0f} unseen images"))
    body = "".join(f"<tr><th>{name}</th><td>{v}</td><td>{ci}</td><td>{chance}</td></tr>"
                   for name, v, ci, chance in rows)
    return ('<table class="metrics exposure"><tr><th></th><th>value</th><th>95% CI</th><th>chance / unseen</th></tr>'
            f"{body}</table>")


def figure_html(uri: str, alt: str) -> str:
    """A wide picture (e.g. :func:`fig_uri` of a matplotlib figure), scaled down to the page width."""
    return f'<img class="wide" src="{uri}" alt="{esc(alt)}">'


def kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in d.items() if v is not None)
    return f'<table class="kv">{rows}</table>'


# ------------------------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d1d1f;padding:0 16px;line-height:1.45}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:30px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#555;margin:0 0 14px}.verdict{border-radius:8px;padding:14px 18px;color:#fff;font-size:17px}
.verdict b.lvl{font-size:22px;display:block;margin-bottom:4px}.verdict ul{margin:6px 0 0;padding-left:22px}
table.metrics td.l{text-align:left}
.badge{color:#fff;border-radius:4px;padding:1px 7px;font-size:12px;font-weight:600}
table{border-collapse:collapse;margin:8px 0;font-size:14px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
table.metrics td{text-align:right;font-variant-numeric:tabular-nums}table.metrics tr:nth-child(even){background:#fafafa}
.cols{display:flex;gap:28px;flex-wrap:wrap}.row{display:flex;align-items:center;gap:3px;margin:2px 0}
.cls{width:70px;text-align:right;padding-right:8px;font-size:13px;color:#444}
figure{margin:0;text-align:center}figure img{display:block;border:1px solid #ccc}
figcaption{font-size:10.5px;color:#555;max-width:64px;line-height:1.15;margin-top:1px}
.pairs{display:flex;flex-wrap:wrap;gap:8px}.pair{border:1px solid #e3e3e3;border-radius:6px;padding:4px 5px}
.figs{display:flex;gap:3px}.pc{font-size:12px;white-space:nowrap}
.idline{font-size:15px;margin:0 0 12px}details{margin:6px 0}summary{cursor:pointer;color:#333}
h3{font-size:16px;margin:14px 0 4px}
.top{margin:10px 0 4px}.top h3{font-size:15px;margin:10px 0 4px}.note{color:#555;font-size:14px}
img.wide{max-width:100%;height:auto;display:block;margin:6px 0}
pre{background:#f5f5f7;padding:10px;overflow-x:auto;
font-size:12.5px;white-space:pre-wrap}ul.th li{margin:2px 0}
"""


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def verdict_html(level: str, headline: str, sentence: str, items: Sequence[str] = ()) -> str:
    """The coloured box at the top: the level, a headline, one sentence (and optional bullet points)."""
    lis = "".join(f"<li>{esc(t)}</li>" for t in items)
    return (f'<div class="verdict" style="background:{COLOURS[level]}"><b class="lvl">{esc(level)} risk: '
            f"{esc(headline)}</b>{esc(sentence)}{f'<ul>{lis}</ul>' if lis else ''}</div>")

def montage(results: Sequence[tuple[str, Any]], class_names: Sequence[str], title: str) -> Any:
    """A matplotlib figure: one row per (name, result), one column per class, each class's best-matching
    image (results have .images, .labels and .nearest_ssim, like scoring.pipeline.Scored and TemplateResult)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, axes = plt.subplots(len(results), k, figsize=(k * 0.62 + 1.4, len(results) * 0.68 + 0.5), squeeze=False)
    for i, (name, res) in enumerate(results):
        for c in range(k):
            ax = axes[i][c]
            ax.set_xticks([]), ax.set_yticks([])
            idx = (res.labels == c).nonzero().flatten()
            if len(idx):
                img = res.images[idx[torch.argmax(res.nearest_ssim[idx])]].clamp(0, 1).numpy()
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_title(str(class_names[c]), fontsize=8)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    return fig
