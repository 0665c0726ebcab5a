"""Pictures people look at instead of numbers: reconstruction grids, nearest-neighbour pairs and the
exposure gallery (the most exposed training images; computed by ``scoring.pipeline.exposure_gallery``)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI, clusters, Ray workers
# Text drawn here holds class names from data (folder names, an npz's class_names): "$x$" must stay text,
# never mathtext, which would fail on it after the whole attack ran. No picture of tldr uses mathtext.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from tldr_core.scoring.pipeline import ExposureGallery


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) numpy for imshow."""
    a = img.detach().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def save_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
              per_row: int = 10, title: str | None = None) -> Path:
    """Draw :func:`grid_figure` into ``path`` (PNG)."""
    fig = grid_figure(images, labels, class_names, per_row=per_row, title=title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_figure(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], per_row: int = 10,
                title: str | None = None) -> Any:
    """One row per class: the first `per_row` images of each class, the class name at the left; the
    title wrapped to the figure's width above the first row. The caller saves and closes it."""
    classes = sorted(set(labels.tolist()))
    cols = min(per_row, max(int((labels == c).sum()) for c in classes))
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 0.9 + 0.8, len(classes) * 0.9 + 0.3),
                             squeeze=False)
    for r, c in enumerate(classes):
        idx = (labels == c).nonzero().flatten()[:cols]
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if k < len(idx):
                ax.imshow(_to_hwc(images[idx[k]]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r][0].set_ylabel(str(class_names[c]) if c < len(class_names) else str(c), rotation=0,
                              ha="right", va="center", fontsize=8)
    top = 0.0
    if title:
        # wrapped to the figure's width; tight_layout ignores a suptitle, so its lines get their own band
        lines = textwrap.wrap(title, width=max(20, int(fig.get_figwidth() / 0.075)))
        top = 0.18 * len(lines) + 0.1
        fig.set_figheight(fig.get_figheight() + top)
        fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.05 / fig.get_figheight(), va="top")
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - top / fig.get_figheight()))
    return fig


def save_nearest(path: str | Path, recon: torch.Tensor, recon_labels: torch.Tensor, nearest: torch.Tensor,
                 scores: torch.Tensor, class_names: Sequence[str], per_class: int = 2,
                 title: str | None = None, ref_name: str = "nearest training image") -> Path:
    """Pairs (reconstruction | its nearest same-class reference image) with the SSIM above each pair.

    nearest (R, C, H, W) holds, for each reconstruction, the reference image found by
    `tldr_core.scoring.nearest` (`ReferenceIndex.nearest` / `nn_ssim`).
    Shows the `per_class` best-matching reconstructions of each class, so the strongest leaks are visible.
    """
    classes = sorted(set(recon_labels.tolist()))
    rows = []
    for c in classes:
        idx = (recon_labels == c).nonzero().flatten()
        order = idx[torch.argsort(scores[idx], descending=True)][:per_class]
        rows.extend(order.tolist())
    ncol_pairs = per_class
    nrow = len(classes)
    fig, axes = plt.subplots(nrow, 2 * ncol_pairs, figsize=(2 * ncol_pairs * 0.95 + 0.8, nrow * 1.05 + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for n, i in enumerate(rows):
        r, k = divmod(n, ncol_pairs)
        a, b = axes[r][2 * k], axes[r][2 * k + 1]
        a.imshow(_to_hwc(recon[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        b.imshow(_to_hwc(nearest[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a.set_title(f"SSIM {float(scores[i]):.2f}", fontsize=7, loc="left")
    for r, c in enumerate(classes):
        axes[r][0].set_ylabel(str(class_names[c]) if c < len(class_names) else str(c), rotation=0, ha="right",
                              va="center", fontsize=8)
    fig.suptitle(title or f"reconstruction (left) beside its {ref_name} (right)", fontsize=9)
    # tight_layout ignores the suptitle: keep ~0.35 inch free above the first row's SSIM labels
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


EXPOSED_COLOUR = "#b3261e"  # the report's HIGH red: an exposed training image's frame and title
_CELL_INCHES = 0.9  # an image's width on the figure


def _rgb(img: torch.Tensor | None, shape: tuple[int, int]) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3); None -> light grey (nothing to show)."""
    if img is None:
        return np.full((*shape, 3), 0.85)
    a = _to_hwc(img)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def gallery_title(gallery: ExposureGallery) -> str:
    shown = sum(r.exposed for r in gallery.rows)
    chance = gallery.by_chance if not math.isnan(gallery.by_chance) else gallery.fpr * gallery.train_size
    verdict = (f"{gallery.distinct} of them with a reconstruction of their own" if gallery.above_chance
               else "within chance (TPR interval reaches the FPR): not a sign of leakage")
    return (f"The {len(gallery.rows)} most exposed training images: {gallery.exposed} of {gallery.train_size} exposed "
            f"(calibrated exposure above {gallery.threshold:.2f}); about {chance:.0f} expected by chance at "
            f"{gallery.fpr:.0%} FPR, {verdict}; {shown} shown\ntraining image | the reconstruction reaching it | "
            "its best match among unseen images of the class | its best match in the population")


def _captions(row: Any, class_names: Sequence[str]) -> tuple[str, str, str, str]:
    cls = str(class_names[row.label]) if row.label < len(class_names) else str(row.label)
    held = (f"held-out #{row.heldout_index}\nSSIM {row.heldout_ssim:.2f}" if row.heldout_index >= 0
            else "no held-out\nimage of class")
    pop = (f"population #{row.population_index}\nSSIM {row.population_ssim:.2f}" if row.population_index >= 0
           else "no population\nimage of class")
    return (f"train #{row.train_index}\nclass {cls}{', exposed' if row.exposed else ''}",
            f"recon #{row.recon_index}\nSSIM {row.raw_exposure:.2f} ({row.exposure:+.2f})", held, pop)


def exposure_gallery_figure(gallery: ExposureGallery, class_names: Sequence[str], *, per_row: int = 3,
                            title: str | None = None) -> Any:
    """A matplotlib figure of ``gallery``: per training image four columns (training image |
    reconstruction | its best held-out match | its best population match), ``per_row`` groups a row,
    SSIMs in the captions (the reconstruction's also its calibrated exposure in brackets); exposed
    training images framed in red. The caller saves and closes it (:func:`save_exposure_gallery`).

    Drawn as ONE image (a mosaic with caption bands) in one axes: a subplot per image cost ~0.1 s each."""
    rows = gallery.rows
    h, w = tuple(rows[0].train_image.shape[1:]) if rows else (8, 8)
    per_row = max(1, min(per_row, len(rows) or 1))
    nrow = max(1, math.ceil(len(rows) / per_row))
    gap, sep, band = max(1, w // 8), max(2, w // 2), max(3, round(h * 0.35))  # pixels
    tw, th = 4 * w + 3 * gap, band + h + gap  # one group's width, one row's height
    canvas = np.ones((nrow * th, per_row * tw + (per_row - 1) * sep, 3))
    spots = []  # (x, y) of each image's top-left pixel, with its row
    for k, row in enumerate(rows):
        r, q = divmod(k, per_row)
        y0, x0 = r * th + band, q * (tw + sep)
        for i, img in enumerate((row.train_image, row.recon_image, row.heldout_image, row.population_image)):
            x = x0 + i * (w + gap)
            canvas[y0 : y0 + h, x : x + w] = _rgb(img, (h, w))
            spots.append((x, y0, row, i))
    inch = _CELL_INCHES / w
    top = 0.45  # inches for the two-line title
    fig = plt.figure(figsize=(canvas.shape[1] * inch + 0.2, canvas.shape[0] * inch + top + 0.1))
    fh = fig.get_figheight()
    ax = fig.add_axes((0.1 / fig.get_figwidth(), 0.1 / fh, 1 - 0.2 / fig.get_figwidth(), 1 - (top + 0.1) / fh))
    ax.imshow(canvas, interpolation="nearest", aspect="auto", vmin=0, vmax=1)
    ax.axis("off")
    for x, y, row, i in spots:
        colour = EXPOSED_COLOUR if row.exposed and i == 0 else "black"
        ax.text(x + (w - 1) / 2, y - 0.8, _captions(row, class_names)[i], ha="center", va="bottom", fontsize=6.5,
                color=colour, linespacing=1.0)
        if row.exposed and i == 0:
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=EXPOSED_COLOUR, linewidth=2))
    fig.text(0.5, 1 - 0.05 / fh, title if title is not None else gallery_title(gallery), ha="center", va="top",
             fontsize=8)
    return fig


def save_exposure_gallery(path: str | Path, gallery: ExposureGallery, class_names: Sequence[str], *,
                          per_row: int = 3, title: str | None = None) -> Path:
    """Draw :func:`exposure_gallery_figure` into ``path`` (PNG)."""
    fig = exposure_gallery_figure(gallery, class_names, per_row=per_row, title=title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
