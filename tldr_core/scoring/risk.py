"""The reconstruction verdict: one attack's metrics -> LOW / MEDIUM / HIGH, with what leaked, in words.

Used by the audit report, the controls, the defence comparison and the re-audit of registered
models, so all state the same level for the same numbers (a page takes the worst attack, :func:`worst`).
The three levels mean (docs/method.md §9):

HIGH    individual training images are recovered: per-image evidence only, either
        ``exposure``: the calibrated exposure (docs/method.md §7) separates T from H' — the lower end
                  of the 95 % interval of its TPR at 1 % FPR > ``high_tpr_ci_low`` (0.10) and of its
                  AUC > 0.5 — and the exposed training images that have a reconstruction of their own
                  (one-to-one) are at least ``high_distinct_fraction`` (0.10) of T and at least
                  ``high_min_images`` (5): one class-average image cannot expose many images at once;
        ``matches``: at least ``high_min_images`` training images matched one-to-one at SSIM >= 0.6,
                  significantly more than held-out images (Fisher's exact test, one-sided p <
                  ``high_match_p``, 0.01).
MEDIUM  a signal specific to this training set, without per-image evidence: the calibrated
        exposure's TPR above chance (``exposure_significant``: lower end > ``medium_tpr_ci_low``, 0.01,
        the FPR itself, and AUC's lower end > 0.5), or the raw exposure's (``raw_exposure``), or a
        significant memorisation gap (``gap_significant``: its bootstrap interval's lower end >
        ``medium_gap_ci_low``, 0.005, the run-to-run noise of the gap measured in docs/defence.md,
        and its permutation test of T against H' (tldr_core.scoring.gap_test) at p < ``medium_gap_p``,
        0.01: the bootstrap resamples only the reconstructions, the permutation the draw of T and H').
LOW     neither. Reconstructions that only look like the classes (as close to T as each class's
        average image, but no closer to T than to unseen images) are class statistics, not a leak of
        this training set; the reason says so.

The memorisation gap alone never makes HIGH (the class mean of a small T has a large gap). The
criteria are checked in that order and the first that holds sets the level (:data:`CRITERIA`).
Metrics without a criterion's keys (older runs) are judged by the others. The thresholds were
written down before the controls were re-run (docs/controls.md), except the gap's permutation test,
added after that run showed the class mean of P (an image set that knows nothing of T) with a gap
interval above 0 on the leaky controls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

LEVELS = ("LOW", "MEDIUM", "HIGH")

#: The thresholds :func:`assess` uses unless given others.
THRESHOLDS: dict[str, float] = {"high_tpr_ci_low": 0.10, "high_distinct_fraction": 0.10, "high_min_images": 5,
                                "high_match_p": 0.01, "medium_tpr_ci_low": 0.01, "medium_gap_ci_low": 0.005,
                                "medium_gap_p": 0.01}

#: The criteria in the order they are checked; Risk.criterion is one of them.
CRITERIA = ("exposure", "matches", "exposure_significant", "raw_exposure", "gap_significant", "none")

#: What each level means, in words a platform team can act on (the verdict sentence starts with it).
MEANING = {
    "HIGH": "individual training images can be reconstructed from this model",
    "MEDIUM": "the model reveals statistics specific to its training set, but no individual training image "
              "was recovered",
    "LOW": "nothing recovered from this model is closer to its training images than to unseen images",
}


@dataclass(frozen=True)
class Risk:
    """level: one of LEVELS; reasons: the clauses that justify it (for the verdict sentence);
    thresholds: the thresholds applied; realism: (quality - noise) / (class mean - noise), NaN when
    the two baselines coincide; criterion: which of CRITERIA set the level."""

    level: str
    reasons: list[str]
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))
    realism: float = math.nan
    criterion: str = "none"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def meaning(self) -> str:
        return MEANING[self.level]


def realism(quality: float, baselines: Mapping[str, Mapping[str, float]]) -> float:
    """(quality - noise quality) / (class-mean quality - noise quality); NaN when they coincide."""
    qn, qc = baselines["noise"]["quality"], baselines["class_mean"]["quality"]
    return (quality - qn) / (qc - qn) if qc - qn > 1e-9 else math.nan


def _has(m: Mapping[str, float], *keys: str) -> bool:
    return all(k in m and m[k] is not None and not math.isnan(float(m[k])) for k in keys)


def _separation(m: Mapping[str, float], prefix: str, tpr_bar: float) -> bool:
    """The lower ends of ``prefix``'s TPR interval above ``tpr_bar`` and of its AUC interval above 0.5."""
    return _has(m, f"{prefix}_tpr_lo", f"{prefix}_auc_lo") and m[f"{prefix}_tpr_lo"] > tpr_bar \
        and m[f"{prefix}_auc_lo"] > 0.5


def separation_clause(m: Mapping[str, float], prefix: str = "exposure") -> str:
    """A separation's numbers in words ("" without its keys)."""
    if not _has(m, *(f"{prefix}_{k}" for k in ("tpr", "tpr_lo", "tpr_hi", "auc", "auc_lo", "auc_hi"))):
        return ""
    what = "calibrated exposure" if prefix == "exposure" else "raw exposure"
    return (f"{what}: {m[f'{prefix}_tpr']:.0%} of the training images above the 1% false-positive threshold "
            f"(95% CI {m[f'{prefix}_tpr_lo']:.0%} to {m[f'{prefix}_tpr_hi']:.0%}; chance 1%), AUC "
            f"{m[f'{prefix}_auc']:.2f} ({m[f'{prefix}_auc_lo']:.2f} to {m[f'{prefix}_auc_hi']:.2f})")


def _distinct_ok(m: Mapping[str, float], th: Mapping[str, float]) -> bool:
    """Enough exposed training images have a reconstruction of their own (|T| = exposed / TPR)."""
    if not _has(m, "exposed_distinct", "exposed_count", "exposure_tpr") or m["exposure_tpr"] <= 0:
        return False
    train_size = m["exposed_count"] / m["exposure_tpr"]
    return m["exposed_distinct"] >= max(th["high_min_images"], th["high_distinct_fraction"] * train_size)


def _matches(m: Mapping[str, float], th: Mapping[str, float]) -> str:
    """The one-to-one evidence at SSIM >= 0.6 in words when it is significant and large enough, else ""."""
    if not _has(m, "matched_train_060", "matched_heldout_060", "matched_p_060"):
        return ""
    if m["matched_train_060"] >= th["high_min_images"] and m["matched_p_060"] < th["high_match_p"]:
        return (f"{m['matched_train_060']:.0f} training images matched one-to-one at SSIM >= 0.6 against "
                f"{m['matched_heldout_060']:.0f} unseen ones (Fisher's exact test p = {m['matched_p_060']:.2g})")
    return ""


def assess(m: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]], *,
           thresholds: Mapping[str, float] | None = None) -> Risk:
    """Risk level of one attack's metrics (score_images' keys: quality, gap, gap_ci_low, gap_ci_high and
    the exposure keys of tldr_core.scoring.exposure_score) against the baselines' qualities (module doc)."""
    th = {**THRESHOLDS, **(thresholds or {})}
    real = realism(m["quality"], baselines)

    def risk(level: str, criterion: str, reason: str) -> Risk:
        return Risk(level, [reason], th, real, criterion)

    cal = separation_clause(m, "exposure")
    if _separation(m, "exposure", th["high_tpr_ci_low"]) and _distinct_ok(m, th):
        return risk("HIGH", "exposure", f"{cal}; {m['exposed_distinct']:.0f} of the {m['exposed_count']:.0f} exposed "
                                        f"training images each have a reconstruction of their own")
    matches = _matches(m, th)
    if matches:
        return risk("HIGH", "matches", matches)
    if _separation(m, "exposure", th["medium_tpr_ci_low"]):
        return risk("MEDIUM", "exposure_significant", f"some training images are reached more closely than "
                                                      f"anything in the population, above chance ({cal})")
    if _separation(m, "raw_exposure", th["medium_tpr_ci_low"]):
        return risk("MEDIUM", "raw_exposure", f"training images are reached more closely than unseen ones, above "
                                              f"chance, but no more closely than population images "
                                              f"({separation_clause(m, 'raw_exposure')})")
    gap = f"memorisation gap {m['gap']:+.3f}, 95% CI {m['gap_ci_low']:+.3f} to {m['gap_ci_high']:+.3f}"
    gap_p = m.get("gap_p", 0.0)  # older metrics: the bootstrap interval alone
    if m["gap_ci_low"] > th["medium_gap_ci_low"] and gap_p < th["medium_gap_p"]:
        return risk("MEDIUM", "gap_significant", f"on average closer to this model's training images than to "
                                                 f"unseen images of the same classes ({gap}; permutation test of "
                                                 f"T against H' p = {gap_p:.2g})")
    if m["gap_ci_low"] > th["medium_gap_ci_low"]:
        gap += f"; but a random split of T and H' gives as large a gap with p = {gap_p:.2g}"
    qc = baselines["class_mean"]["quality"]
    look = f"quality {m['quality']:.2f} against {qc:.2f} for the class-mean image"
    if not math.isnan(real) and real >= 1.0:
        return risk("LOW", "none", f"as close to the training images as each class's average image ({look}) but no "
                                   f"closer to them than to unseen ones ({gap}): class statistics, not this training set")
    realism_words = f"{real:.0%} of the way from noise to it" if not math.isnan(real) else "the baselines coincide"
    return risk("LOW", "none", f"no closer to the training images than to unseen images of the same classes beyond "
                               f"chance ({gap}), and they resemble the data less than a class average does ({look}; "
                               f"{realism_words})")


def worst(risks: Sequence[Risk]) -> int:
    """Index of the highest level among ``risks`` (the first on ties)."""
    return max(range(len(risks)), key=lambda i: LEVELS.index(risks[i].level))
