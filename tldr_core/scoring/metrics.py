"""Reconstruction-quality metrics (docs/method.md), computed the same way for every attack, trial,
baseline and report.

With reconstructions ``R`` (each conditioned on a label), the classifier's training set ``T`` and
a held-out set ``H`` of the same distribution that the classifier never saw, and
``nn_ssim(r, S) = max_{s in S, same class as r} SSIM(r, s)`` (:mod:`tldr_core.scoring.nearest`),
:func:`score_reconstructions` returns (keys exactly :data:`METRIC_KEYS`):

- ``n_recon``: R.
- ``quality = mean_r nn_ssim(r, T)``.
- ``quality_heldout = mean_r nn_ssim(r, H')``, where H' holds, per class c, the first k_c held-out
  images of class c (in order), k_c = |T_c|.
- ``gap = mean_r [nn_ssim(r, T_m) - nn_ssim(r, H')]`` (paired per reconstruction). Normally
  T_m = T. If H has fewer than k_c images of some class, H' keeps all of them and T_m is T reduced
  to its first |H'_c| images of that class, for the gap only (then gap != quality - quality_heldout).
- ``gap_ci_low``, ``gap_ci_high``: 95% percentile bootstrap CI of the gap (reconstructions
  resampled with replacement ``n_boot`` times, seeded); ``gap_significant``: 1.0 if gap_ci_low > 0.
- ``gap_matched_per_class``: min over the classes of R of |H'_c| (T's per-class size when H is
  large enough and T is balanced).
- ``coverage``: fraction of T for which some same-class r has SSIM(r, t) >= ``tau`` (T images of
  classes without reconstructions count as not covered); ``tau``: the threshold used.
- ``label_agreement``: fraction of R whose classifier argmax equals its label (NaN without a classifier).
- ``diversity``: 1 - mean SSIM between distinct reconstructions of the same class, averaged
  (unweighted) over classes with >= 2 reconstructions; NaN if there is no such class.

SSIM is scikit-image's (see :mod:`tldr_core.scoring.ssim`). Reconstructions are clamped to [0, 1]
before anything is scored (SSIM is computed with ``data_range=1``; values outside the range are not
images and would otherwise inflate or deflate the statistics); reference images are expected in
[0, 1] already and are used as given.

The ``train``, ``heldout`` and ``test`` arguments are duck-typed: any object with ``.images``
(N, C, H, W) float in [0, 1] and ``.labels`` (N,) int64 (e.g. ``tldr_core.attack.data.Split``), or
a :class:`~tldr_core.scoring.nearest.ReferenceIndex` of one (reused across calls). Work is
vectorised per class; nothing loops over pairs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from tldr_core.scoring.nearest import (METHODS, NearestResult, ReferenceIndex, SearchStats, as_images, as_labels,
                                       check_method, check_same_shape, class_index, nn_ssim, search)
from tldr_core.scoring.ssim import ssim_matrix

__all__ = [
    "METRIC_KEYS",
    "BASELINES",
    "METHODS",
    "NearestResult",
    "ReferenceIndex",
    "SearchStats",
    "nn_ssim",
    "score_reconstructions",
    "baseline_sets",
    "score_baselines",
]

#: The keys of :func:`score_reconstructions`' dict, in order (MLflow / metrics.json names).
METRIC_KEYS: tuple[str, ...] = (
    "n_recon",
    "quality",
    "quality_heldout",
    "gap",
    "gap_ci_low",
    "gap_ci_high",
    "gap_significant",
    "gap_matched_per_class",
    "coverage",
    "tau",
    "label_agreement",
    "diversity",
)

#: The names of :func:`baseline_sets`' entries, in order.
BASELINES: tuple[str, ...] = ("noise", "class_mean", "heldout_real")

_CLASSIFIER_BATCH = 256


class SplitLike(Protocol):
    images: Tensor  # (N, C, H, W) float in [0, 1]
    labels: Tensor  # (N,) int64


def _bootstrap_ci(d: Tensor, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(d): resample entries with replacement ``n_boot`` times."""
    g = torch.Generator().manual_seed(seed)
    n = d.numel()
    means = torch.empty(n_boot, dtype=torch.float64)
    step = max(1, 2**22 // max(n, 1))  # bound the (step, n) index matrix to ~32 MB
    for b0 in range(0, n_boot, step):
        nb = min(step, n_boot - b0)
        idx = torch.randint(n, (nb, n), generator=g)
        means[b0 : b0 + nb] = d[idx].mean(dim=1)
    alpha = (1.0 - level) / 2
    q = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


@torch.no_grad()
def _label_agreement(classifier: torch.nn.Module, recon: Tensor, labels: Tensor) -> float:
    """Fraction of ``recon`` whose classifier argmax equals ``labels``.

    Eval mode, no grad, batches of 256, on the classifier's device; the module's train/eval
    mode is restored afterwards.
    """
    p = next(iter(classifier.parameters()), None)
    device = p.device if p is not None else recon.device
    dtype = p.dtype if p is not None and p.is_floating_point() else recon.dtype
    was_training = classifier.training
    classifier.eval()
    try:
        hits = 0
        for i in range(0, recon.shape[0], _CLASSIFIER_BATCH):
            out = classifier(recon[i : i + _CLASSIFIER_BATCH].to(device, dtype))
            pred = out.argmax(dim=1).cpu()
            hits += int((pred == labels[i : i + _CLASSIFIER_BATCH]).sum())
    finally:
        classifier.train(was_training)
    return hits / recon.shape[0]


@dataclass
class _Nearest:
    """Per-reconstruction nearest-neighbour SSIMs of :func:`score_reconstructions` (all (R,) float64)."""

    t: Tensor        # nn_ssim(r, T)
    t_matched: Tensor  # nn_ssim(r, T_m), size-matched T for the gap
    h: Tensor        # nn_ssim(r, H')
    covered: Tensor  # (|T|,) bool
    matched: list[int] = field(default_factory=list)     # |H'_c| per class
    similarity: list[float] = field(default_factory=list)  # mean off-diagonal SSIM per class with >= 2


def _class_search(r_c: Tensor, t: ReferenceIndex, ti: Tensor, h: ReferenceIndex, hi: Tensor, tau: float,
                  method: str, stats: SearchStats | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(nn_ssim to T_c, to T_c's first m, to H'_c = H_c's first m, coverage flags of T_c), m = min(|T_c|, |H_c|)."""
    m = min(ti.numel(), hi.numel())
    dev = r_c.device
    if method == "brute":  # the reference: full matrices
        m_t = ssim_matrix(r_c, t.images[ti].to(dev)).to("cpu", torch.float64)  # (r_c, |T_c|)
        m_h = ssim_matrix(r_c, h.images[hi[:m]].to(dev)).to("cpu", torch.float64)  # (r_c, m)
        return m_t.max(dim=1).values, m_t[:, :m].max(dim=1).values, m_h.max(dim=1).values, m_t.max(dim=0).values >= tau
    nn_t, _, covered = search(r_c, t, ti, tau, method, stats)
    nn_tm = nn_t if m == ti.numel() else search(r_c, t, ti[:m], None, method, stats)[0]
    return nn_t, nn_tm, search(r_c, h, hi[:m], None, method, stats)[0], covered


def _per_class(recon: Tensor, rl: Tensor, t: ReferenceIndex, h: ReferenceIndex, tau: float, method: str,
               stats: SearchStats | None) -> _Nearest:
    n = recon.shape[0]
    z = lambda: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    res = _Nearest(z(), z(), z(), torch.zeros(len(t), dtype=torch.bool))
    for c in torch.unique(rl).tolist():
        ri, ti, hi = class_index(rl, c), class_index(t.labels, c), class_index(h.labels, c)
        if ti.numel() == 0:
            raise ValueError(f"class {c} has reconstructions but no training images")
        if hi.numel() == 0:
            raise ValueError(f"class {c} has reconstructions but no held-out images")
        r_c = recon[ri.to(recon.device)]
        res.t[ri], res.t_matched[ri], res.h[ri], res.covered[ti] = _class_search(r_c, t, ti, h, hi, tau, method, stats)
        res.matched.append(min(ti.numel(), hi.numel()))
        k = ri.numel()
        if k >= 2:
            m_r = ssim_matrix(r_c, r_c).to("cpu", torch.float64)
            res.similarity.append(float((m_r.sum() - m_r.diagonal().sum()) / (k * (k - 1))))
    return res


def score_reconstructions(recon: Tensor, recon_labels: Tensor, train: SplitLike, heldout: SplitLike, *,
                          classifier: torch.nn.Module | None = None, tau: float = 0.5, n_boot: int = 1000,
                          seed: int = 0, method: str = "prefilter", stats: SearchStats | None = None
                          ) -> dict[str, float]:
    """All reconstruction metrics (module doc), as a flat dict of floats with keys :data:`METRIC_KEYS`.

    recon: (R, C, H, W), clamped to [0, 1] first (also before the classifier sees them); recon_labels:
    (R,) int64 labels each was conditioned on; train / heldout: T and H (splits or ReferenceIndex);
    classifier: the frozen classifier (logits (B, K)) or None; tau: coverage's SSIM threshold; n_boot
    (>= 1) and seed: the gap's bootstrap; method: "prefilter" (default), "pruned" or "brute"
    (:mod:`tldr_core.scoring.nearest`); stats: counters the searches add to.

    Raises ValueError: empty ``recon``; a class of ``recon_labels`` with no training or no held-out
    image; mismatched shapes; n_boot < 1.
    """
    check_method(method)
    recon = as_images(recon, "recon").clamp(0.0, 1.0)
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    t, h = ReferenceIndex.of(train, "train"), ReferenceIndex.of(heldout, "heldout")
    check_same_shape(recon, t.images, "recon vs train")
    check_same_shape(recon, h.images, "recon vs heldout")
    n = recon.shape[0]
    if n == 0:
        raise ValueError("score_reconstructions: no reconstructions")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    nn = _per_class(recon, rl, t, h, tau, method, stats)
    d = nn.t_matched - nn.h
    ci_low, ci_high = _bootstrap_ci(d, n_boot, seed)
    label_agreement = math.nan if classifier is None else _label_agreement(classifier, recon, rl)
    diversity = 1.0 - sum(nn.similarity) / len(nn.similarity) if nn.similarity else math.nan
    out = {"n_recon": float(n), "quality": float(nn.t.mean()), "quality_heldout": float(nn.h.mean()),
           "gap": float(d.mean()), "gap_ci_low": ci_low, "gap_ci_high": ci_high,
           "gap_significant": 1.0 if ci_low > 0 else 0.0, "gap_matched_per_class": float(min(nn.matched)),
           "coverage": float(nn.covered.double().mean()), "tau": float(tau),
           "label_agreement": float(label_agreement), "diversity": float(diversity)}
    assert tuple(out) == METRIC_KEYS
    return out


def baseline_sets(
    train: SplitLike, test: SplitLike, num_classes: int, per_class: int, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Reference "reconstructions" to score next to real ones (docs/method.md).

    Returns {name: (images (M, C, H, W) float32 in [0, 1], labels (M,) int64)}, on CPU:
        noise:        uniform [0, 1) images, ``per_class`` per class, labels cycled
                      (0, 1, ..., K-1, 0, 1, ...), seeded by ``seed``.
        class_mean:   each class's mean training image, ``per_class`` copies per class, labels
                      cycled the same way (nn_ssim of a repeated image equals one copy's).
        heldout_real: ``per_class`` real images per class drawn without replacement (seeded)
                      from ``test`` (not from the held-out set H, which would match itself),
                      grouped by class. A class with fewer test images contributes all it has
                      (with a warning).

    Raises:
        ValueError: a class in range(num_classes) with no training image, or no test image.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes}, {per_class}")
    t, s = ReferenceIndex.of(train, "train"), ReferenceIndex.of(test, "test")
    t_img, t_lab, s_img, s_lab = t.images.cpu(), t.labels, s.images.cpu(), s.labels
    check_same_shape(t_img, s_img, "train vs test")
    shape = tuple(t_img.shape[1:])
    cycled = torch.arange(num_classes, dtype=torch.int64).repeat(per_class)

    noise = torch.rand((cycled.numel(), *shape), generator=torch.Generator().manual_seed(seed))

    means = torch.empty((num_classes, *shape), dtype=torch.float32)
    for c in range(num_classes):
        ti = class_index(t_lab, c)
        if ti.numel() == 0:
            raise ValueError(f"baseline_sets: class {c} has no training images")
        means[c] = t_img[ti].mean(dim=0)
    class_mean = means[cycled]

    g = torch.Generator().manual_seed(seed + 1)
    real_idx: list[Tensor] = []
    for c in range(num_classes):
        si = class_index(s_lab, c)
        if si.numel() == 0:
            raise ValueError(f"baseline_sets: class {c} has no test images")
        if si.numel() < per_class:
            warnings.warn(
                f"baseline_sets: class {c} has only {si.numel()} test images (< per_class={per_class})",
                stacklevel=2,
            )
        real_idx.append(si[torch.randperm(si.numel(), generator=g)[:per_class]])
    ri = torch.cat(real_idx)

    return {
        "noise": (noise, cycled.clone()),
        "class_mean": (class_mean, cycled.clone()),
        "heldout_real": (s_img[ri].clone(), s_lab[ri].clone()),
    }


def score_baselines(
    train: SplitLike,
    heldout: SplitLike,
    test: SplitLike,
    num_classes: int,
    per_class: int,
    *,
    classifier: torch.nn.Module | None = None,
    tau: float = 0.5,
    seed: int = 0,
    n_boot: int = 1000,
    method: str = "prefilter",
    stats: SearchStats | None = None,
) -> dict[str, dict[str, float]]:
    """Each of :func:`baseline_sets` scored with :func:`score_reconstructions` (same code path).

    Returns {baseline name: metrics dict with keys :data:`METRIC_KEYS`}.
    """
    t, h = ReferenceIndex.of(train, "train"), ReferenceIndex.of(heldout, "heldout")  # one index each for all three
    sets = baseline_sets(t, test, num_classes, per_class, seed=seed)
    return {
        name: score_reconstructions(images, labels, t, h, classifier=classifier, tau=tau, n_boot=n_boot, seed=seed,
                                    method=method, stats=stats)
        for name, (images, labels) in sets.items()
    }
