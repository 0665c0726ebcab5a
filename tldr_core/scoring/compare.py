"""Two versions of one classifier compared on the same images: is the candidate leakier than the version it
would replace? (docs/registry.md, "Comparison")

Both versions are scored on the same training set T and the same held-out set H' (same data lineage), so
their per-image scores pair up by image. For each score (the calibrated exposure of an attack, the
membership score of the best membership attack both ran) the statistics that the verdict reads, the AUC
of T against H' and the TPR at 1 % FPR (tldr_core.scoring.membership), are computed for both versions,
and their difference (candidate minus baseline) gets a 95 % **paired** percentile-bootstrap interval:
each draw resamples the indices of T and of H' once, with replacement, and both versions are evaluated
on that same draw. Pairing removes what both versions share (easy and hard images), so the interval is
that of the difference, not of two independent estimates.

A **regression** is, on some axis, a difference whose interval lies above 0 (its lower end > 0: the
candidate separates members from non-members better), or a verdict level that rose (LOW -> MEDIUM,
MEDIUM -> HIGH, on the reconstruction or the membership axis). Every difference is a separate 95 %
interval; with k axes x 2 statistics the chance that one of them excludes 0 between two equally leaky
versions is larger than 5 % (docs/registry.md says how to read that).

Torch only; the bootstrap reuses the AUC / TPR kernel of :mod:`tldr_core.scoring.membership`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from tldr_core.scoring.membership import (_BOOT_ELEMS, _allowed, auc, auc_tpr_of_counts, check_scores, cumulative,
                                          resample_counts, tpr_at_fpr)
from tldr_core.scoring.mia import unresolved_reason
from tldr_core.scoring.risk import LEVELS

__all__ = ["LEVEL", "FPR", "Difference", "AxisComparison", "Comparison", "align", "paired_bootstrap",
           "compare_axis", "level_rose", "verdict_levels"]

LEVEL = 0.95   # the intervals' coverage
FPR = 0.01     # the TPR compared is the verdict's, at 1 % FPR
N_BOOT = 1000


@dataclass(frozen=True)
class Difference:
    """One statistic of both versions and candidate minus baseline, with its paired interval. A TPR that
    H' cannot resolve (fewer than 1 / FPR images) is NaN throughout, with the reason in ``note``."""

    statistic: str                 # "auc" | "tpr"
    baseline: float
    candidate: float
    delta: float
    ci: tuple[float, float]
    note: str = ""

    @property
    def leakier(self) -> bool:
        """The candidate is leakier on this statistic: the interval's lower end is above 0."""
        return not math.isnan(self.ci[0]) and self.ci[0] > 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "baseline": self.baseline, "candidate": self.candidate,
                "delta": self.delta, "ci_low": self.ci[0], "ci_high": self.ci[1], "leakier": self.leakier,
                **({"note": self.note} if self.note else {})}


def align(baseline: Mapping[int, float], candidate: Mapping[int, float], what: str) -> tuple[Tensor, Tensor]:
    """The two versions' scores of the same images ({image index: score} each), ordered by index, as two
    float64 tensors. ValueError naming ``what`` when the versions scored different images."""
    if set(baseline) != set(candidate):
        only_a, only_b = len(set(baseline) - set(candidate)), len(set(candidate) - set(baseline))
        raise ValueError(f"{what}: the versions scored different images ({only_a} only in the baseline, "
                         f"{only_b} only in the candidate)")
    keys = sorted(baseline)
    return (torch.tensor([float(baseline[k]) for k in keys], dtype=torch.float64),
            torch.tensor([float(candidate[k]) for k in keys], dtype=torch.float64))


def _sorted(x: Tensor) -> tuple[Tensor, Tensor]:
    s = x.sort()
    return s.values, s.indices


def paired_bootstrap(pos_a: Tensor, neg_a: Tensor, pos_b: Tensor, neg_b: Tensor, *, fpr: float = FPR,
                     n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict[str, Difference]:
    """AUC and TPR at ``fpr`` of version a (baseline) and b (candidate) on the same images, and b - a with
    paired percentile-bootstrap intervals.

    pos_a[i] and pos_b[i] score the same training image i (T), neg_a[j] and neg_b[j] the same held-out
    image j (H'). Each of ``n_boot`` draws (seeded) resamples the indices of T and of H' with replacement,
    once, and evaluates both versions on them (the TPR threshold is re-read from each version's
    resampled H'). Returns {"auc": Difference, "tpr": Difference}."""
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    pa, na, pb, nb = (check_scores(x, n) for x, n in ((pos_a, "pos_a"), (neg_a, "neg_a"), (pos_b, "pos_b"),
                                                        (neg_b, "neg_b")))
    if pa.numel() != pb.numel() or na.numel() != nb.numel():
        raise ValueError(f"paired scores need the same images: T {pa.numel()} vs {pb.numel()}, "
                         f"H' {na.numel()} vs {nb.numel()}")
    p, q = pa.numel(), na.numel()
    why = unresolved_reason(fpr, q)
    ks = torch.tensor([_allowed(fpr, q)], dtype=torch.int64)
    sides = [(_sorted(pa), _sorted(na)), (_sorted(pb), _sorted(nb))]
    g = torch.Generator().manual_seed(seed)
    step = max(1, _BOOT_ELEMS // (p + q))
    d_auc, d_tpr = [], []
    for b0 in range(0, n_boot, step):
        ct, ch = resample_counts(p, min(step, n_boot - b0), g), resample_counts(q, min(step, n_boot - b0), g)
        (auc_a, tpr_a), (auc_b, tpr_b) = (
            auc_tpr_of_counts(ps, ns, ks, cumulative(ct[:, po]), cumulative(ch[:, no])) for (ps, po), (ns, no) in sides)
        d_auc.append(auc_b - auc_a)
        d_tpr.append(tpr_b[:, 0] - tpr_a[:, 0])
    alpha = (1.0 - level) / 2
    qs = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    qa, qt = torch.quantile(torch.cat(d_auc), qs), torch.quantile(torch.cat(d_tpr), qs)
    a_auc, b_auc = auc(pa, na), auc(pb, nb)
    out = {"auc": Difference("auc", a_auc, b_auc, b_auc - a_auc, (float(qa[0]), float(qa[1])))}
    if why:
        nan = math.nan
        out["tpr"] = Difference("tpr", nan, nan, nan, (nan, nan), note=why)
    else:
        a_tpr, b_tpr = tpr_at_fpr(pa, na, fpr)[0], tpr_at_fpr(pb, nb, fpr)[0]
        out["tpr"] = Difference("tpr", a_tpr, b_tpr, b_tpr - a_tpr, (float(qt[0]), float(qt[1])))
    return out


@dataclass(frozen=True)
class AxisComparison:
    """One paired score compared: ``axis`` names it ("exposure.tldr", "membership.margin", ...)."""

    axis: str
    differences: dict[str, Difference]
    n_train: int
    n_heldout: int

    @property
    def leakier(self) -> bool:
        return any(d.leakier for d in self.differences.values())

    def as_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "n_train": self.n_train, "n_heldout": self.n_heldout, "leakier": self.leakier,
                "differences": {k: d.as_dict() for k, d in self.differences.items()}}


def compare_axis(axis: str, train: tuple[Mapping[int, float], Mapping[int, float]],
                 heldout: tuple[Mapping[int, float], Mapping[int, float]], *, n_boot: int = N_BOOT,
                 seed: int = 0) -> AxisComparison:
    """One axis from per-image scores keyed by image index: ``train`` = (baseline's, candidate's) on T,
    ``heldout`` likewise on H'. ValueError when the versions scored different images."""
    pos_a, pos_b = align(*train, what=f"{axis} on T")
    neg_a, neg_b = align(*heldout, what=f"{axis} on H'")
    diffs = paired_bootstrap(pos_a, neg_a, pos_b, neg_b, n_boot=n_boot, seed=seed)
    return AxisComparison(axis, diffs, pos_a.numel(), neg_a.numel())


def level_rose(before: str | None, after: str | None) -> bool:
    """Whether a verdict level rose (LOW < MEDIUM < HIGH; anything else, e.g. "not run", never rises)."""
    return before in LEVELS and after in LEVELS and LEVELS.index(after) > LEVELS.index(before)


@dataclass
class Comparison:
    """A candidate version against its baseline: the paired axes (empty when the lineages differ), the
    verdict levels of both per verdict axis, and whether the two could be paired (``note`` says why not)."""

    axes: list[AxisComparison] = field(default_factory=list)
    levels: dict[str, tuple[str, str]] = field(default_factory=dict)  # verdict axis -> (baseline, candidate)
    paired: bool = True
    note: str = ""

    @property
    def regressed_axes(self) -> list[str]:
        """The axes on which the candidate is leakier, then "verdict.<axis>" for every verdict level that rose."""
        out = [a.axis for a in self.axes if a.leakier]
        return out + [f"verdict.{k}" for k, (a, b) in self.levels.items() if level_rose(a, b)]

    @property
    def regression(self) -> bool:
        return bool(self.regressed_axes)

    def as_dict(self) -> dict[str, Any]:
        return {"regression": self.regression, "regressed_axes": self.regressed_axes, "paired": self.paired,
                "note": self.note, "levels": {k: {"baseline": a, "candidate": b} for k, (a, b) in self.levels.items()},
                "axes": [a.as_dict() for a in self.axes]}


def verdict_levels(baseline: Mapping[str, str], candidate: Mapping[str, str],
                   axes: Sequence[str] = ("reconstruction", "membership")) -> dict[str, tuple[str, str]]:
    """{axis: (baseline level, candidate level)} of the verdict axes both name."""
    return {a: (str(baseline[a]), str(candidate[a])) for a in axes if a in baseline and a in candidate}
