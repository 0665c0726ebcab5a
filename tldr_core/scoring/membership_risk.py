"""The membership axis of the verdict: the membership-inference metrics -> LOW / MEDIUM / HIGH.

Judged on the strongest attack that ran (:func:`membership_attack`: offline LiRA when reference
models were trained, else the logit margin, else the loss; docs/method.md §10), from the keys of
:meth:`tldr_core.scoring.mia.MembershipResult.metrics`. Checked in order, the first that holds
sets the level:

HIGH   ``membership``: the lower end of the 95 % interval of the TPR at 1 % FPR > 0.10 and the
       AUC's lower end > 0.5: at least one training image in ten is picked out as a member while
       only 1 % of unseen images are;
MEDIUM ``membership_significant``: the TPR's lower end > 0.01 (chance: a model that never saw T
       sits at TPR = FPR = 1 % by construction) and the AUC's lower end > 0.5;
MEDIUM ``membership_average``: the AUC's lower end > 0.6: members score clearly higher on average,
       though no group of them is singled out at 1 % FPR (at a small H' the TPR at 1 % FPR is read
       off the second-highest unseen score, so its interval is wide);
LOW    ``unresolved``: the TPR at 1 % FPR is NaN (H' has fewer than 100 images) and the AUC does not
       reach the average criterion; the reason says so;
LOW    ``none``: otherwise.

The TPR thresholds were fixed before the control runs (as the reconstruction rule's; docs/method.md §9).
``membership_average`` was added after the first control cell: leaky-fc's margin attack reached AUC
0.89 [0.84, 0.95] with TPR 0.06 [0.01, 0.27] at |H'| = 100, and the rule without it called that LOW
with a reason ("not told apart above chance") the AUC contradicts (docs/controls.md).
"""
from __future__ import annotations

import math
from typing import Mapping

from tldr_core.scoring.risk import Risk

__all__ = ["MEMBERSHIP_THRESHOLDS", "MEMBERSHIP_CRITERIA", "membership_attack", "assess_membership"]

#: The thresholds :func:`assess_membership` uses unless given others.
MEMBERSHIP_THRESHOLDS: dict[str, float] = {"membership_high_tpr_ci_low": 0.10, "membership_medium_tpr_ci_low": 0.01,
                                           "membership_auc_ci_low": 0.5, "membership_average_auc_ci_low": 0.6}
#: The criteria in the order they are checked; Risk.criterion is one of them.
MEMBERSHIP_CRITERIA = ("membership", "membership_significant", "membership_average", "unresolved", "none")

_WHO = {"lira": "offline LiRA with {k} reference models", "margin": "the classifier's logit margin alone",
        "loss": "the classifier's loss alone"}


def membership_attack(m: Mapping[str, float], prefix: str = "mia_") -> str:
    """The attack the verdict is judged on: "lira", "margin" or "loss", the first whose AUC is in ``m``.

    Raises:
        ValueError: ``m`` holds no membership metrics (membership inference did not run).
    """
    for name in ("lira", "margin", "loss"):
        v = m.get(f"{prefix}{name}_auc")
        if v is not None and not math.isnan(v):
            return name
    raise ValueError("no membership-inference metrics (mia_*_auc): membership inference was not run")


def _numbers(m: Mapping[str, float], p: str, who: str) -> str:
    return (f"{who} flags {m[p + 'tpr_1']:.1%} of the training images at a 1% false-positive rate "
            f"(95% CI {m[p + 'tpr_1_lo']:.1%} to {m[p + 'tpr_1_hi']:.1%}; chance 1%), membership AUC "
            f"{m[p + 'auc']:.2f} ({m[p + 'auc_lo']:.2f} to {m[p + 'auc_hi']:.2f})")


def assess_membership(m: Mapping[str, float], *, thresholds: Mapping[str, float] | None = None,
                      prefix: str = "mia_") -> Risk:
    """Membership level of an audit's metrics (module doc). ``Risk.thresholds`` records the
    thresholds applied, ``Risk.criterion`` one of :data:`MEMBERSHIP_CRITERIA`."""
    th = {**MEMBERSHIP_THRESHOLDS, **(thresholds or {})}
    name = membership_attack(m, prefix)
    p = f"{prefix}{name}_"
    who = _WHO[name].format(k=int(m.get(f"{prefix}lira_k", 0)))

    def risk(level: str, criterion: str, reason: str) -> Risk:
        return Risk(level, [reason], th, math.nan, criterion)

    tpr_lo, auc_lo = m.get(p + "tpr_1_lo", math.nan), m[p + "auc_lo"]
    above = auc_lo > th["membership_auc_ci_low"]
    # a NaN TPR (H' under 100 images) fails both comparisons: only the AUC's criterion can hold then
    if above and tpr_lo > th["membership_high_tpr_ci_low"]:
        return risk("HIGH", "membership", f"the model memorises individual training images: {_numbers(m, p, who)}. "
                                          f"Whoever can query it can tell who was in its training set; retrain with "
                                          f"stronger regularisation, fewer epochs or more data (or DP-SGD) before "
                                          f"release")
    if above and tpr_lo > th["membership_medium_tpr_ci_low"]:
        return risk("MEDIUM", "membership_significant",
                    f"some training images are recognisable as members above chance: {_numbers(m, p, who)}. "
                    f"membership.csv lists them, most exposed first; check whether they are outliers or duplicates")
    if auc_lo > th["membership_average_auc_ci_low"]:
        return risk("MEDIUM", "membership_average",
                    f"training images score clearly higher than unseen ones on average (membership AUC "
                    f"{m[p + 'auc']:.2f}, {auc_lo:.2f} to {m[p + 'auc_hi']:.2f}, by {who}), though no group of them "
                    f"is singled out at a 1% false-positive rate beyond chance"
                    + (f" ({_numbers(m, p, who)})" if not math.isnan(tpr_lo) else "")
                    + "; the model has fitted its training set more closely than unseen data")
    if math.isnan(tpr_lo):
        n = int(m.get(f"{prefix}n_heldout", 0))
        return risk("LOW", "unresolved", f"membership could not be measured at a 1% false-positive rate: H' has {n} "
                                         f"images and needs at least 100 (membership AUC {m[p + 'auc']:.2f}, "
                                         f"{auc_lo:.2f} to {m[p + 'auc_hi']:.2f}); audit with a larger held-out set")
    return risk("LOW", "none", f"no group of training images is told apart from unseen ones above chance at a 1% "
                               f"false-positive rate, and not clearly on average either: {_numbers(m, p, who)}")
