"""Membership statistics of two score samples: the Mann-Whitney AUC, the TPR at a fixed FPR and
their joint percentile-bootstrap intervals (used by :mod:`tldr_core.scoring.exposure` on the
exposures of training and held-out images; docs/method.md §7)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["auc", "fpr_threshold", "tpr_at_fpr", "bootstrap_intervals", "bootstrap_intervals_at", "resample_counts",
           "cumulative", "auc_tpr_of_counts", "check_scores"]

_BOOT_ELEMS = 1 << 20  # resamples x (P + Q) per bootstrap block: ~10 float64 temporaries of <= 8 MB


def check_scores(x: Any, name: str) -> Tensor:
    """``x`` as a flat float64 CPU tensor; ValueError when it is empty or holds NaN."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().reshape(-1).cpu()
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def resample_counts(n: int, boots: int, g: torch.Generator) -> Tensor:
    """(boots, n) float64: how often each of n items is drawn in each of ``boots`` resamples of size n
    with replacement (one ``torch.randint`` call on ``g``)."""
    idx = torch.randint(n, (boots, n), generator=g)
    ones = torch.ones(boots, n, dtype=torch.float64)
    return torch.zeros(boots, n, dtype=torch.float64).scatter_add_(1, idx, ones)


def cumulative(counts: Tensor) -> Tensor:
    """(B, n) counts -> (B, n + 1) cumulative counts with a leading 0 column (what the kernel reads)."""
    return torch.cat([torch.zeros(counts.shape[0], 1, dtype=torch.float64), counts.cumsum(dim=1)], dim=1)


def _sorted_counts(n: int, boots: int, g: torch.Generator | None) -> Tensor:
    """(boots, n + 1) cumulative resample counts of positions 0..n-1, leading 0 column.

    g None: one "resample" that is the sample itself (all counts 1)."""
    counts = torch.ones(1, n, dtype=torch.float64) if g is None else resample_counts(n, boots, g)
    return cumulative(counts)


def _auc_tpr(pos: Tensor, neg: Tensor, ks: Tensor, boots: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """AUC and TPRs of ``boots`` joint resamples (or of the sample itself if ``g`` is None).

    pos (P,), neg (Q,) sorted ascending; ks (F,) int64, the negatives allowed above each threshold
    (:func:`_allowed`, one per FPR). A resample is a count per position; with C the cumulative
    counts, the negatives below / tied with pos[i] are C[lo_i] and C[hi_i] - C[lo_i]
    (lo, hi = searchsorted left / right), so AUC = sum_i w_i (C[lo_i] + (C[hi_i] - C[lo_i]) / 2) / (P Q):
    the Mann-Whitney statistic with midranks, in O(boots (P + Q)). Every FPR is read off the same
    resample. Returns (auc (boots,), tpr (boots, F))."""
    cn, cp = _sorted_counts(neg.numel(), boots, g), _sorted_counts(pos.numel(), boots, g)
    return auc_tpr_of_counts(pos, neg, ks, cp, cn)


def auc_tpr_of_counts(pos: Tensor, neg: Tensor, ks: Tensor, cp: Tensor, cn: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_auc_tpr`'s kernel for resamples given as cumulative counts (:func:`cumulative`) over the
    sorted positions of ``pos`` (cp, (B, P + 1)) and ``neg`` (cn, (B, Q + 1)): the paired bootstrap of
    :mod:`tldr_core.scoring.compare` draws the counts itself. Returns (auc (B,), tpr (B, F))."""
    p, q = pos.numel(), neg.numel()
    lo = torch.searchsorted(neg, pos, right=False)
    hi = torch.searchsorted(neg, pos, right=True)
    below = cn.index_select(1, lo) + 0.5 * (cn.index_select(1, hi) - cn.index_select(1, lo))  # (B, P)
    auc_b = ((cp[:, 1:] - cp[:, :-1]) * below).sum(dim=1) / (p * q)
    # threshold: the (k+1)-th largest resampled negative = the first sorted position m whose
    # cumulative count C[m + 1] exceeds Q - k - 1
    level = (q - ks.to(torch.float64) - 1.0).expand(cn.shape[0], -1).contiguous()  # (B, F)
    m = torch.searchsorted(cn[:, 1:].contiguous(), level, right=True)
    thr = neg[m.clamp_max(q - 1)]  # (B, F)
    at_or_below = torch.searchsorted(pos, thr, right=True)  # positives <= threshold, per resample and FPR
    tpr_b = (p - cp.gather(1, at_or_below)) / p
    return auc_b, tpr_b


def auc(pos: Tensor, neg: Tensor) -> float:
    """Mann-Whitney AUC: P(pos > neg) over all pairs, ties counted 1/2.

    pos (P,), neg (Q,): scores (e.g. training / held-out exposures). 1.0: every positive above
    every negative; 0.5: indistinguishable (or all tied)."""
    pos, neg = check_scores(pos, "pos").sort().values, check_scores(neg, "neg").sort().values
    return float(_auc_tpr(pos, neg, torch.zeros(1, dtype=torch.int64), 1, None)[0][0])


def _allowed(fpr: float, q: int) -> int:
    """k = floor(fpr * q): negatives allowed strictly above the threshold (1e-9 absorbs float
    error, e.g. 0.29 * 100 = 28.999...)."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    return min(q - 1, int(math.floor(fpr * q + 1e-9)))


def fpr_threshold(neg: Tensor, fpr: float = 0.01) -> float:
    """The smallest value that at most ``fpr`` of ``neg`` strictly exceed.

    That is the (k+1)-th largest of ``neg``, k = floor(fpr * len(neg)): with 100 negatives and
    fpr = 0.01, the second largest. Ties with it are below the bar (scores must be > it)."""
    neg = check_scores(neg, "neg").sort(descending=True).values
    return float(neg[_allowed(fpr, neg.numel())])


def tpr_at_fpr(pos: Tensor, neg: Tensor, fpr: float = 0.01) -> tuple[float, float]:
    """(TPR, threshold): the fraction of ``pos`` strictly above :func:`fpr_threshold` (neg, fpr)."""
    pos = check_scores(pos, "pos")
    thr = fpr_threshold(neg, fpr)
    return float((pos > thr).double().mean()), thr


def bootstrap_intervals(pos: Tensor, neg: Tensor, *, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile-bootstrap intervals of :func:`auc` and of the TPR of :func:`tpr_at_fpr`.

    ``pos`` and ``neg`` are resampled independently, with replacement, ``n_boot`` times (seeded);
    each resample gets its own threshold. Vectorised: O(n_boot (P + Q)) work in blocks of
    resamples, no sort per resample. One FPR of :func:`bootstrap_intervals_at` (same draws).

    Returns ((auc_lo, auc_hi), (tpr_lo, tpr_hi)).
    """
    auc_ci, tpr_cis = bootstrap_intervals_at(pos, neg, fprs=(fpr,), n_boot=n_boot, seed=seed, level=level)
    return auc_ci, tpr_cis[0]


def bootstrap_intervals_at(pos: Tensor, neg: Tensor, *, fprs: Sequence[float] = (0.01,), n_boot: int = 1000,
                           seed: int = 0, level: float = 0.95
                           ) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """:func:`bootstrap_intervals` at several FPRs at once: every TPR is read off the same resamples.

    Returns ((auc_lo, auc_hi), [(tpr_lo, tpr_hi) for each of ``fprs``, in order]). With one FPR the
    draws, and so the intervals, are those of :func:`bootstrap_intervals` with that FPR.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(fprs) == 0:
        raise ValueError("fprs is empty")
    pos, neg = check_scores(pos, "pos").sort().values, check_scores(neg, "neg").sort().values
    ks = torch.tensor([_allowed(f, neg.numel()) for f in fprs], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    step = max(1, _BOOT_ELEMS // (pos.numel() + neg.numel()))
    aucs, tprs = [], []
    for b0 in range(0, n_boot, step):
        a, t = _auc_tpr(pos, neg, ks, min(step, n_boot - b0), g)
        aucs.append(a)
        tprs.append(t)
    alpha = (1.0 - level) / 2
    qs = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    qa, qt = torch.quantile(torch.cat(aucs), qs), torch.quantile(torch.cat(tprs), qs, dim=0)  # qt (2, F)
    return (float(qa[0]), float(qa[1])), [(float(qt[0, i]), float(qt[1, i])) for i in range(len(fprs))]
