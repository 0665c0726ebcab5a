"""Pictures people look at instead of numbers: reconstruction grids and nearest-neighbour pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI, clusters, Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) numpy for imshow."""
    a = img.detach().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def save_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
              per_row: int = 10, title: str | None = None) -> Path:
    """One row per class: the first `per_row` images of each class, the class name at the left."""
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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_nearest(path: str | Path, recon: torch.Tensor, recon_labels: torch.Tensor, nearest: torch.Tensor,
                 scores: torch.Tensor, class_names: Sequence[str], per_class: int = 2,
                 title: str | None = None, ref_name: str = "nearest training image") -> Path:
    """Pairs (reconstruction | its nearest same-class reference image) with the SSIM above each pair.

    nearest (R, C, H, W) holds, for each reconstruction, the reference image found by `metrics.nn_ssim`.
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
