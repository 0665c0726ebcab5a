"""The risk rule (tldr_core.scoring.risk): levels at the stated thresholds, and the thresholds as a parameter."""
from __future__ import annotations

import math

import pytest

from tldr_core.scoring.risk import CRITERIA, LEVELS, THRESHOLDS, Risk, assess, realism, worst

BASE = {"noise": {"quality": 0.05}, "class_mean": {"quality": 0.55}}


def _m(quality=0.2, gap=0.0, lo=-0.01, hi=0.01, coverage=0.0):
    return {"quality": quality, "gap": gap, "gap_ci_low": lo, "gap_ci_high": hi, "gap_significant": float(lo > 0),
            "coverage": coverage, "tau": 0.5}


def test_risk_levels_follow_the_stated_thresholds():
    assert assess(_m(gap=0.05, lo=0.03, hi=0.07), BASE).level == "HIGH"
    assert assess(_m(gap=0.02, lo=0.01, hi=0.03, coverage=0.2), BASE).level == "HIGH"
    assert assess(_m(gap=0.02, lo=0.01, hi=0.03), BASE).level == "MEDIUM"
    assert assess(_m(gap=0.004, lo=0.001, hi=0.007), BASE).level == "LOW"  # CI above 0 but within run-to-run noise
    r = assess(_m(quality=0.6), BASE)  # as close as the class-mean image (0.55), no gap
    assert r.level == "MEDIUM" and "class-level" in r.reason and r.realism == pytest.approx(1.1)
    r = assess(_m(quality=0.35), BASE)  # 60% of the way from noise to the class mean: LOW, and says so
    assert r.level == "LOW" and "60%" in r.reason
    assert assess(_m(quality=0.2, coverage=0.3), BASE).level == "LOW"  # coverage without a gap is realism only
    assert assess(_m(quality=0.2), BASE).level == "LOW"


def test_each_criterion_is_named_and_reasons_are_a_list():
    cases = [(_m(lo=0.03), "gap"), (_m(lo=0.01, coverage=0.2), "coverage"), (_m(lo=0.01), "gap_significant"),
             (_m(quality=0.6), "class_level"), (_m(), "none")]
    for m, criterion in cases:
        r = assess(m, BASE)
        assert r.criterion == criterion and criterion in CRITERIA
        assert isinstance(r.reasons, list) and r.reasons and r.reason == "; ".join(r.reasons)
        assert r.thresholds == THRESHOLDS


def test_boundaries_are_strict_and_thresholds_can_be_replaced():
    assert assess(_m(lo=0.02), BASE).level == "MEDIUM"  # exactly at HIGH's bound: not above it
    assert assess(_m(lo=0.005), BASE).level == "LOW"
    strict = assess(_m(lo=0.01), BASE, thresholds={"high_gap_ci_low": 0.009})
    assert strict.level == "HIGH" and strict.thresholds["high_gap_ci_low"] == 0.009
    assert strict.thresholds["medium_gap_ci_low"] == THRESHOLDS["medium_gap_ci_low"]  # the others kept


def test_realism_by_hand_and_when_baselines_coincide():
    assert realism(0.3, BASE) == pytest.approx((0.3 - 0.05) / (0.55 - 0.05))
    flat = {"noise": {"quality": 0.4}, "class_mean": {"quality": 0.4}}
    assert math.isnan(realism(0.9, flat))
    assert assess(_m(quality=0.9), flat).level == "LOW"  # NaN realism never reaches MEDIUM


def test_worst_takes_the_highest_level_first_on_ties():
    rs = [Risk(level, [level]) for level in ("MEDIUM", "LOW", "HIGH", "HIGH")]
    assert worst(rs) == 2
    assert worst([Risk("LOW", ["a"]), Risk("LOW", ["b"])]) == 0
    assert LEVELS == ("LOW", "MEDIUM", "HIGH")


def _exp(tpr, lo, hi, auc=0.7, auc_lo=0.6, auc_hi=0.8, **kw):
    return {**_m(**kw), "exposure_tpr": tpr, "exposure_tpr_lo": lo, "exposure_tpr_hi": hi, "exposure_auc": auc,
            "exposure_auc_lo": auc_lo, "exposure_auc_hi": auc_hi, "matched_train_040": 12.0,
            "matched_heldout_040": 3.0}


def test_exposure_sets_high_and_medium_and_needs_its_interval_above_chance():
    r = assess(_exp(0.4, 0.25, 0.55), BASE)
    assert (r.level, r.criterion) == ("HIGH", "exposure")
    assert "40% of the training images" in r.reason and "12 training images matched" in r.reason
    assert assess(_exp(0.08, 0.03, 0.15), BASE).criterion == "exposure_significant"
    assert assess(_exp(0.08, 0.03, 0.15), BASE).level == "MEDIUM"
    # at the boundaries (strictly above), or with an AUC interval that reaches 0.5: not exposure
    assert assess(_exp(0.2, 0.10, 0.3), BASE).level == "MEDIUM"
    assert assess(_exp(0.05, 0.01, 0.1), BASE).level == "LOW"
    assert assess(_exp(0.4, 0.25, 0.55, auc=0.55, auc_lo=0.5), BASE).level == "LOW"
    # a clean-looking exposure does not hide a significant gap (the other criteria still apply)
    assert assess({**_exp(0.01, 0.0, 0.03), **_m(lo=0.03)}, BASE).criterion == "gap"


def test_metrics_without_exposure_or_with_nan_exposure_use_the_other_criteria():
    m = _exp(0.4, 0.25, 0.55)
    m["exposure_tpr_lo"] = math.nan
    assert assess(m, BASE).level == "LOW"
    assert "exposure_significant" in CRITERIA and THRESHOLDS["high_tpr_ci_low"] == 0.10
