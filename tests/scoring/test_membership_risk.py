"""The membership axis of the verdict (tldr_core.scoring.membership_risk) on constructed metrics."""
from __future__ import annotations

import math

import pytest

from tldr_core.scoring.membership_risk import (MEMBERSHIP_CRITERIA, MEMBERSHIP_THRESHOLDS, assess_membership,
                                               membership_attack)


def _m(name="margin", tpr=0.05, lo=0.02, hi=0.08, auc=0.6, auc_lo=0.55, auc_hi=0.65, **extra):
    p = f"mia_{name}_"
    return {p + "auc": auc, p + "auc_lo": auc_lo, p + "auc_hi": auc_hi, p + "tpr_1": tpr, p + "tpr_1_lo": lo,
            p + "tpr_1_hi": hi, "mia_n_heldout": 1000.0, **extra}


def test_three_levels_at_the_stated_thresholds():
    r = assess_membership(_m(tpr=0.3, lo=0.2, hi=0.4, auc=0.8, auc_lo=0.75))
    assert (r.level, r.criterion) == ("HIGH", "membership")
    assert "30.0% of the training images" in r.reason and "20.0% to 40.0%" in r.reason and "retrain" in r.reason
    r = assess_membership(_m(tpr=0.05, lo=0.02, hi=0.08))
    assert (r.level, r.criterion) == ("MEDIUM", "membership_significant") and "membership.csv" in r.reason
    r = assess_membership(_m(tpr=0.012, lo=0.004, hi=0.02, auc=0.51, auc_lo=0.48))
    assert (r.level, r.criterion) == ("LOW", "none") and "not clearly on average either" in r.reason
    assert {c for c in MEMBERSHIP_CRITERIA} >= {r.criterion}
    assert r.thresholds == MEMBERSHIP_THRESHOLDS


def test_boundaries_are_strict_and_need_the_auc_too():
    assert assess_membership(_m(lo=0.10)).level == "MEDIUM"  # 0.10 is not > 0.10
    assert assess_membership(_m(lo=0.101)).level == "HIGH"
    assert assess_membership(_m(lo=0.01)).level == "LOW"  # exactly chance
    assert assess_membership(_m(lo=0.3, auc_lo=0.5)).level == "LOW"  # TPR high but AUC not above 0.5
    assert assess_membership(_m(lo=0.01, auc_lo=0.6)).level == "LOW"  # AUC at the average bar: not above it
    assert assess_membership(_m(lo=0.05), thresholds={"membership_high_tpr_ci_low": 0.04}).level == "HIGH"


def test_judged_on_lira_when_it_ran():
    m = {**_m("margin", lo=0.0), **_m("lira", tpr=0.2, lo=0.12, hi=0.3, auc=0.7, auc_lo=0.66), "mia_lira_k": 8.0}
    assert membership_attack(m) == "lira"
    r = assess_membership(m)
    assert r.level == "HIGH" and "offline LiRA with 8 reference models" in r.reason
    m["mia_lira_auc"] = math.nan  # LiRA present but not computed: the margin is judged
    assert membership_attack(m) == "margin" and assess_membership(m).level == "LOW"
    with pytest.raises(ValueError, match="not run"):
        membership_attack({"quality": 0.3})


def test_unresolved_tpr_is_low_and_says_why():
    r = assess_membership({**_m(lo=math.nan, tpr=math.nan, hi=math.nan), "mia_n_heldout": 60.0})
    assert (r.level, r.criterion) == ("LOW", "unresolved") and "H' has 60 images" in r.reason


def test_a_clear_average_separation_is_medium_even_when_the_tpr_is_unresolved_or_at_chance():
    # leaky-fc's margin attack at |H'| = 100: AUC 0.89 [0.84, 0.95], TPR 0.06 [0.01, 0.27]
    r = assess_membership(_m(tpr=0.06, lo=0.01, hi=0.27, auc=0.89, auc_lo=0.84, auc_hi=0.95))
    assert (r.level, r.criterion) == ("MEDIUM", "membership_average")
    assert "0.89, 0.84 to 0.95" in r.reason and "6.0% of the training images" in r.reason
    r = assess_membership({**_m(lo=math.nan, tpr=math.nan, hi=math.nan, auc=0.7, auc_lo=0.65), "mia_n_heldout": 60.0})
    assert (r.level, r.criterion) == ("MEDIUM", "membership_average") and "nan" not in r.reason
