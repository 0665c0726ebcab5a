"""The risk rule: one attack's metrics and the baselines -> LOW / MEDIUM / HIGH, with the reason.

Used by the audit report, the defence comparison and the re-audit of registered models, so all
three state the same level for the same numbers. Per attack (a page takes the worst, :func:`worst`):

HIGH   exposure: the 95% CI lower bound of the TPR at 1% FPR (the fraction of training images whose
       exposure e(t) exceeds all but 1% of the held-out images', docs/method.md §7) > ``high_tpr_ci_low``
       (0.10) and the AUC's lower bound > 0.5: one training image in ten, at least, comes back
       recognisably, which unseen images do not;
HIGH   the memorisation gap's 95% CI lower bound > ``high_gap_ci_low`` (0.02), or coverage@tau >
       ``high_coverage`` (0.05) while the gap is significant (specific training images come back);
MEDIUM exposure above chance: the TPR's CI lower bound > ``medium_tpr_ci_low`` (0.01, the FPR itself:
       a model that never saw T sits at 0.01 by construction) and the AUC's lower bound > 0.5;
MEDIUM the gap is significant: its CI lower bound > ``medium_gap_ci_low`` (0.005, the run-to-run
       noise of the gap measured in docs/defence.md: the bootstrap CI covers only the resampling of
       reconstructions, and on the defence comparison it excluded 0 on both sides for variants with
       no effect); or the reconstructions' quality reaches ``medium_realism`` (1.0) of the way from
       the noise baseline's quality to the class-mean baseline's (a class-level leak);
LOW    otherwise.

The criteria are checked in that order and the first that holds sets the level (:data:`CRITERIA`
names them). Metrics without the exposure keys (older runs) are judged by the other criteria. The
thresholds were set before the control runs and checked on them (docs/controls.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

HIGH_GAP_CI_LOW = 0.02
MEDIUM_GAP_CI_LOW = 0.005
HIGH_COVERAGE = 0.05
MEDIUM_REALISM = 1.0  # quality as a fraction of the way from the noise to the class-mean baseline
HIGH_TPR_CI_LOW = 0.10  # exposure: TPR at 1% FPR, lower end of its bootstrap interval
MEDIUM_TPR_CI_LOW = 0.01
LEVELS = ("LOW", "MEDIUM", "HIGH")

#: The thresholds :func:`assess` uses unless given others.
THRESHOLDS: dict[str, float] = {"high_gap_ci_low": HIGH_GAP_CI_LOW, "medium_gap_ci_low": MEDIUM_GAP_CI_LOW,
                                "high_coverage": HIGH_COVERAGE, "medium_realism": MEDIUM_REALISM,
                                "high_tpr_ci_low": HIGH_TPR_CI_LOW, "medium_tpr_ci_low": MEDIUM_TPR_CI_LOW}

#: The criteria in the order they are checked; Risk.criterion is one of them.
CRITERIA = ("exposure", "gap", "coverage", "exposure_significant", "gap_significant", "class_level", "none")


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


def realism(quality: float, baselines: Mapping[str, Mapping[str, float]]) -> float:
    """(quality - noise quality) / (class-mean quality - noise quality); NaN when they coincide."""
    qn, qc = baselines["noise"]["quality"], baselines["class_mean"]["quality"]
    return (quality - qn) / (qc - qn) if qc - qn > 1e-9 else math.nan


def assess(m: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]], *,
           thresholds: Mapping[str, float] | None = None) -> Risk:
    """Risk level of one attack's metrics (score_reconstructions' keys quality, gap, gap_ci_low,
    gap_ci_high, coverage, optional tau) against the baselines' qualities (module doc)."""
    th = {**THRESHOLDS, **(thresholds or {})}
    real = realism(m["quality"], baselines)
    qc = baselines["class_mean"]["quality"]
    gap = f"memorisation gap {m['gap']:+.3f}, 95% CI {m['gap_ci_low']:+.3f} to {m['gap_ci_high']:+.3f}"
    look = f"quality {m['quality']:.2f} against {qc:.2f} for the class-mean image"

    def risk(level: str, criterion: str, reason: str) -> Risk:
        return Risk(level, [reason], th, real, criterion)

    exposed = _exposure_clause(m)
    if exposed and m["exposure_tpr_lo"] > th["high_tpr_ci_low"] and m["exposure_auc_lo"] > 0.5:
        return risk("HIGH", "exposure", f"individual training images come back: {exposed}")

    if m["gap_ci_low"] > th["high_gap_ci_low"]:
        return risk("HIGH", "gap", f"clearly closer to this model's own training images than to unseen images of "
                                   f"the same classes ({gap}): what comes out is specific to its training set, not "
                                   f"just to the classes")
    significant = m["gap_ci_low"] > th["medium_gap_ci_low"]
    if significant and m["coverage"] > th["high_coverage"]:
        return risk("HIGH", "coverage", f"{m['coverage']:.0%} of the training images have one at SSIM >= "
                                        f"{m.get('tau', 0.5):g}, and they favour training over unseen images ({gap})")
    if exposed and m["exposure_tpr_lo"] > th["medium_tpr_ci_low"] and m["exposure_auc_lo"] > 0.5:
        return risk("MEDIUM", "exposure_significant", f"some training images come back more closely than unseen "
                                                      f"images do, above chance: {exposed}")
    if significant:
        return risk("MEDIUM", "gap_significant",
                    f"slightly but significantly closer to the training images than to unseen ones ({gap})")
    if real >= th["medium_realism"]:
        return risk("MEDIUM", "class_level", f"as close to the training images as each class's average image "
                                             f"({look}) but no closer to them than to unseen ones ({gap}): a "
                                             f"class-level leak, not of individual images")
    return risk("LOW", "none", f"no closer to the training images than to unseen images of the same classes beyond "
                               f"the gap's run-to-run noise ({gap}), and they resemble the data less than a class "
                               f"average does ({look}; {real:.0%} of the way from noise to it)")


def _exposure_clause(m: Mapping[str, float]) -> str:
    """The exposure numbers in words, "" when ``m`` has no exposure keys."""
    keys = ("exposure_tpr", "exposure_tpr_lo", "exposure_tpr_hi", "exposure_auc", "exposure_auc_lo", "exposure_auc_hi")
    if not all(k in m and not math.isnan(m[k]) for k in keys):
        return ""
    text = (f"{m['exposure_tpr']:.0%} of the training images are exposed at a 1% false-positive rate "
            f"(95% CI {m['exposure_tpr_lo']:.0%} to {m['exposure_tpr_hi']:.0%}; chance 1%), exposure AUC "
            f"{m['exposure_auc']:.2f} ({m['exposure_auc_lo']:.2f} to {m['exposure_auc_hi']:.2f})")
    if "matched_train_040" in m and "matched_heldout_040" in m:
        text += (f", {m['matched_train_040']:.0f} training images matched one-to-one at SSIM >= 0.4 against "
                 f"{m['matched_heldout_040']:.0f} unseen ones")
    return text


def worst(risks: Sequence[Risk]) -> int:
    """Index of the highest level among ``risks`` (the first on ties)."""
    return max(range(len(risks)), key=lambda i: LEVELS.index(risks[i].level))
