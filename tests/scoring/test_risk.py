"""The risk rule (tldr_core.scoring.risk): its three levels on constructed metrics, at the stated
thresholds, and the thresholds as a parameter. HIGH needs per-image evidence; the gap alone never does."""
from __future__ import annotations

import math

import pytest

from tldr_core.scoring.exact_test import fisher_greater
from tldr_core.scoring.risk import CRITERIA, LEVELS, MEANING, THRESHOLDS, Risk, assess, realism, worst

BASE = {"noise": {"quality": 0.05}, "class_mean": {"quality": 0.55}}


def _m(quality=0.2, gap=0.0, lo=-0.01, hi=0.01):
    return {"quality": quality, "gap": gap, "gap_ci_low": lo, "gap_ci_high": hi, "coverage": 0.0, "tau": 0.5}


def _sep(prefix, tpr, lo, hi, auc=0.7, auc_lo=0.6, auc_hi=0.8):
    return {f"{prefix}_tpr": tpr, f"{prefix}_tpr_lo": lo, f"{prefix}_tpr_hi": hi, f"{prefix}_auc": auc,
            f"{prefix}_auc_lo": auc_lo, f"{prefix}_auc_hi": auc_hi}


def _exp(tpr, lo, hi, *, train=100, distinct=None, auc_lo=0.6, matched=(0, 0), p=1.0, raw=(0.01, 0.0, 0.03), **kw):
    exposed = round(tpr * train)
    return {**_m(**kw), **_sep("exposure", tpr, lo, hi, auc_lo=auc_lo), **_sep("raw_exposure", *raw),
            "exposed_count": float(exposed), "exposed_distinct": float(exposed if distinct is None else distinct),
            "matched_train_060": float(matched[0]), "matched_heldout_060": float(matched[1]), "matched_p_060": p}


def test_high_needs_calibrated_per_image_evidence():
    r = assess(_exp(0.4, 0.25, 0.55), BASE)
    assert (r.level, r.criterion) == ("HIGH", "exposure")
    assert "40% of the training images" in r.reason and "40 of the 40 exposed" in r.reason
    # the same separation reached by few reconstructions (a class average exposes many images at once)
    r = assess(_exp(0.4, 0.25, 0.55, distinct=10), BASE)  # 10 = 0.10 x |T|: not above the bar's count
    assert (r.level, r.criterion) == ("HIGH", "exposure")  # >= max(5, 0.10 x 100) holds at exactly 10
    r = assess(_exp(0.4, 0.25, 0.55, distinct=9), BASE)
    assert (r.level, r.criterion) == ("MEDIUM", "exposure_significant")
    assert assess(_exp(0.4, 0.25, 0.55, auc_lo=0.5), BASE).level != "HIGH"  # AUC at chance
    assert assess(_exp(0.2, 0.10, 0.3), BASE).criterion == "exposure_significant"  # exactly at the bar: not above
    # small T: the absolute minimum of 5 images applies (20 images, TPR 0.2 -> 4 exposed)
    assert assess(_exp(0.2, 0.15, 0.3, train=20), BASE).criterion == "exposure_significant"


def test_high_by_one_to_one_matches_with_the_exact_test():
    p = fisher_greater(8, 100, 0, 100)  # hand: C(100, 8) / C(200, 8) = (100/200)(99/199)...(93/193) = 0.003378
    assert p == pytest.approx(0.003378, abs=1e-6)
    r = assess(_exp(0.02, 0.0, 0.05, matched=(8, 0), p=p), BASE)
    assert (r.level, r.criterion) == ("HIGH", "matches")
    assert "8 training images matched one-to-one at SSIM >= 0.6 against 0 unseen" in r.reason
    assert assess(_exp(0.02, 0.0, 0.05, matched=(4, 0), p=fisher_greater(4, 100, 0, 100)), BASE).level != "HIGH"
    assert assess(_exp(0.02, 0.0, 0.05, matched=(9, 3), p=fisher_greater(9, 100, 3, 100)), BASE).level != "HIGH"


def test_medium_is_a_training_set_signal_without_per_image_evidence():
    assert assess(_exp(0.08, 0.03, 0.15), BASE).criterion == "exposure_significant"
    r = assess(_exp(0.01, 0.0, 0.03, raw=(0.12, 0.04, 0.2)), BASE)
    assert (r.level, r.criterion) == ("MEDIUM", "raw_exposure") and "raw exposure" in r.reason
    # the gap: significant -> MEDIUM, however large (never HIGH on its own)
    r = assess({**_exp(0.01, 0.0, 0.03), **_m(gap=0.09, lo=0.05, hi=0.12)}, BASE)
    assert (r.level, r.criterion) == ("MEDIUM", "gap_significant")
    assert assess(_m(gap=0.5, lo=0.4, hi=0.6), BASE).level == "MEDIUM"  # older metrics, no exposure keys
    # the bootstrap interval above the noise but a random split of T and H' as large: not significant
    r = assess({**_exp(0.01, 0.0, 0.03), **_m(gap=0.026, lo=0.007, hi=0.048), "gap_p": 0.2}, BASE)
    assert (r.level, r.criterion) == ("LOW", "none") and "random split of T and H' gives as large a gap" in r.reason
    r = assess({**_exp(0.01, 0.0, 0.03), **_m(gap=0.026, lo=0.007, hi=0.048), "gap_p": 0.002}, BASE)
    assert (r.level, r.criterion) == ("MEDIUM", "gap_significant") and "p = 0.002" in r.reason
    assert assess(_m(gap=0.004, lo=0.001, hi=0.007), BASE).level == "LOW"  # within run-to-run noise


def test_low_and_class_statistics():
    r = assess(_exp(0.01, 0.0, 0.03, quality=0.6), BASE)  # as close to T as the class mean, no T signal
    assert (r.level, r.criterion) == ("LOW", "none") and "class statistics" in r.reason
    r = assess(_exp(0.01, 0.0, 0.03, quality=0.35), BASE)
    assert r.level == "LOW" and "60% of the way" in r.reason and r.realism == pytest.approx(0.6)
    flat = {"noise": {"quality": 0.3}, "class_mean": {"quality": 0.3}}
    r = assess(_m(quality=0.9), flat)
    assert r.level == "LOW" and "nan" not in r.reason.lower() and math.isnan(r.realism)


def test_every_criterion_reachable_and_recorded():
    cases = {"exposure": _exp(0.4, 0.25, 0.55), "matches": _exp(0.02, 0.0, 0.05, matched=(8, 0), p=0.001),
             "exposure_significant": _exp(0.08, 0.03, 0.15), "raw_exposure": _exp(0.01, 0.0, 0.03, raw=(0.1, 0.03, 0.2)),
             "gap_significant": _m(gap=0.02, lo=0.01, hi=0.03), "none": _m()}
    assert set(cases) == set(CRITERIA)
    for criterion, m in cases.items():
        r = assess(m, BASE)
        assert r.criterion == criterion and r.thresholds == THRESHOLDS and r.meaning == MEANING[r.level]


def test_thresholds_are_a_parameter():
    m = _exp(0.08, 0.03, 0.15)
    assert assess(m, BASE).level == "MEDIUM"
    strict = assess(m, BASE, thresholds={"high_tpr_ci_low": 0.02, "high_distinct_fraction": 0.05})
    assert strict.level == "HIGH" and strict.thresholds["medium_gap_ci_low"] == THRESHOLDS["medium_gap_ci_low"]


def test_realism_and_worst():
    assert realism(0.3, BASE) == pytest.approx(0.5)
    rs = [Risk(level, [level]) for level in ("MEDIUM", "LOW", "HIGH", "HIGH")]
    assert worst(rs) == 2 and LEVELS == ("LOW", "MEDIUM", "HIGH")
    assert worst([Risk("LOW", ["a"]), Risk("LOW", ["b"])]) == 0
