"""A permutation test of the memorisation gap: is what comes out closer to T than to H' beyond what the
draw of T and H' alone gives?

The gap (docs/method.md §6) is ``mean_r [max_{t in T_m,c} SSIM(r, t) - max_{h in H'_c} SSIM(r, h)]``
with T_m,c and H'_c the first m = min(|T_c|, |H_c|) images of class c. Its bootstrap interval resamples
the reconstructions only, so it is silent about the other source of chance: which images happened to
fall into T and which into H'. With one image per class and ten images per set, an image set that never
saw T (each class's mean *population* image) gets a bootstrap interval well above 0 just because T's
draw held a more typical digit than H''s.

Under the null hypothesis that the reconstructions do not depend on which images are in T, T_m,c and
H'_c are exchangeable: the test recomputes the gap with the union T_m,c ∪ H'_c split at random into two
sets of the same sizes, ``n_perm`` times (seeded), per class, and reports the one-sided p-value
``(1 + #{permuted gap >= observed}) / (1 + n_perm)``. The SSIMs are computed once (reconstructions x
the union, per class: small next to the nearest-neighbour searches), the permutations only reindex.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tldr_core.scoring.nearest import as_images, as_labels
from tldr_core.scoring.ssim import ssim_matrix

__all__ = ["gap_permutation_test"]

_BLOCK = 1 << 22  # permutations x reconstructions x columns per block (float64: 32 MB)


def _class_columns(t_lab: Tensor, h_lab: Tensor, c: int) -> tuple[Tensor, Tensor]:
    ti, hi = (t_lab == c).nonzero(as_tuple=True)[0], (h_lab == c).nonzero(as_tuple=True)[0]
    m = min(ti.numel(), hi.numel())
    return ti[:m], hi[:m]


def _permuted_sums(s: Tensor, m: int, n_perm: int, g: torch.Generator) -> Tensor:
    """(n_perm,) sums over the rows of max(first m permuted columns) - max(the other m), for s (R_c, 2m)."""
    out = []
    step = max(1, _BLOCK // max(1, s.numel()))
    for p0 in range(0, n_perm, step):
        k = min(step, n_perm - p0)
        perm = torch.argsort(torch.rand(k, s.shape[1], generator=g), dim=1)  # (k, 2m) random splits
        cols = s[:, perm]  # (R_c, k, 2m)
        out.append((cols[..., :m].amax(dim=2) - cols[..., m:].amax(dim=2)).sum(dim=0))
    return torch.cat(out)


def gap_permutation_test(recon: Any, recon_labels: Any, train: Any, heldout: Any, *, n_perm: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """(observed gap, one-sided permutation p-value) of ``recon`` (R, C, H, W), clamped to [0, 1], with
    labels (R,) against ``train`` and ``heldout`` (objects with ``.images`` and ``.labels``).

    Classes of the reconstructions without a training or held-out image are left out (the gap has
    no value there); ValueError when none is left or ``n_perm`` < 1."""
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    recon = as_images(recon, "recon").clamp(0.0, 1.0)
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    t_lab = as_labels(train.labels, len(train.labels), "train.labels")
    h_lab = as_labels(heldout.labels, len(heldout.labels), "heldout.labels")
    g = torch.Generator().manual_seed(seed)
    observed, null, rows = 0.0, torch.zeros(n_perm, dtype=torch.float64), 0
    for c in torch.unique(rl).tolist():
        ti, hi = _class_columns(t_lab, h_lab, c)
        if ti.numel() == 0:
            continue
        r_c = recon[(rl == c).nonzero(as_tuple=True)[0].to(recon.device)]
        union = torch.cat([train.images[ti], heldout.images[hi]]).to(r_c.device, torch.float32)
        s = ssim_matrix(r_c, union).to("cpu", torch.float64)  # (R_c, 2m): T's m columns, then H''s
        m = ti.numel()
        observed += float((s[:, :m].amax(dim=1) - s[:, m:].amax(dim=1)).sum())
        null += _permuted_sums(s, m, n_perm, g)
        rows += r_c.shape[0]
    if rows == 0:
        raise ValueError("gap_permutation_test: no class has reconstructions, training and held-out images")
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_perm)
    return observed / rows, p
