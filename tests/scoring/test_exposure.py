"""Tests of tldr_core.scoring.exposure (per-image scans, calibration offsets, matching) and of the
membership statistics it feeds (hand-computed AUC / TPR@FPR, bootstrap). CPU, tiny, ~1 s in all."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from tldr_core.scoring.exposure import NO_RECON, calibrated_matching, exposure, max_matching, population_match, scan
from tldr_core.scoring.membership import auc, bootstrap_intervals, fpr_threshold, tpr_at_fpr
from tldr_core.scoring.ssim import ssim_matrix

from image_sets import S, textures  # noqa: E402 - tests/scoring/image_sets.py

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- AUC


def test_auc_with_ties_by_hand():
    # pairs (pos, neg): (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 (2,2)=1/2 (2,0)=1 -> 4 / 6
    assert auc([1.0, 2.0, 2.0], [2.0, 0.0]) == pytest.approx(4 / 6, abs=1e-12)
    # swapping the roles gives 1 - AUC
    assert auc([2.0, 0.0], [1.0, 2.0, 2.0]) == pytest.approx(2 / 6, abs=1e-12)


@pytest.mark.parametrize(
    "pos, neg, expected",
    [
        ([0.5, 0.9], [0.1, 0.2, 0.3], 1.0),  # perfect separation
        ([0.1], [0.5, 0.9], 0.0),  # perfectly reversed
        ([0.3, 0.3], [0.3], 0.5),  # all tied
        ([7.0], [7.0], 0.5),  # one vs one, tied
        ([1.0, 3.0], [2.0, 4.0], 0.25),  # (1,2)=0 (1,4)=0 (3,2)=1 (3,4)=0
        ([-1.0, -1.0, 0.8], [-1.0, 0.2], (0.5 + 0 + 0.5 + 0 + 1 + 1) / 6),  # NO_RECON ties count 1/2
    ],
)
def test_auc_cases(pos, neg, expected):
    assert auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([1.0], [math.nan])


# ----------------------------------------------------------------------------- TPR at FPR


def test_threshold_is_exact_with_100_negatives():
    neg = torch.arange(100, dtype=torch.float64) / 100  # 0.00, 0.01, ..., 0.99
    # k = floor(0.01 * 100) = 1 negative may lie above: the threshold is the 2nd largest, 0.98
    assert fpr_threshold(neg, 0.01) == pytest.approx(0.98, abs=1e-12)
    assert fpr_threshold(neg, 0.0) == pytest.approx(0.99, abs=1e-12)  # nothing above: the max
    assert fpr_threshold(neg, 0.05) == pytest.approx(0.94, abs=1e-12)  # 6th largest
    assert fpr_threshold(neg, 0.29) == pytest.approx(0.70, abs=1e-12)  # 0.29 * 100 = 28.999...: still k = 29
    assert fpr_threshold(neg, 0.015) == pytest.approx(0.98, abs=1e-12)  # floor(1.5) = 1
    for fpr in (0.0, 0.01, 0.05, 0.29):  # realised FPR never exceeds the target
        assert (neg > fpr_threshold(neg, fpr)).double().mean() <= fpr + 1e-12


def test_tpr_ties_at_threshold_are_not_exposed():
    neg = torch.arange(100, dtype=torch.float64) / 100
    pos = [0.98, 0.985, 0.99, 1.0, 0.5]  # 0.98 equals the threshold: not counted
    tpr, thr = tpr_at_fpr(pos, neg, 0.01)
    assert thr == pytest.approx(0.98, abs=1e-12)
    assert tpr == pytest.approx(3 / 5, abs=1e-12)
    # tied negatives: the threshold is the tied value, and positives equal to it are not above it
    assert tpr_at_fpr([0.5, 0.6], [0.5] * 100, 0.01) == (0.5, 0.5)
    # tiny negative set: floor(0.01 * 5) = 0, the threshold is the max
    assert tpr_at_fpr([0.2, 0.4, 0.41], [0.1, 0.4, 0.3, 0.0, 0.2], 0.01) == (pytest.approx(1 / 3), 0.4)


def test_fpr_validation():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="fpr"):
            fpr_threshold([0.1, 0.2], bad)


# ----------------------------------------------------------------------------- bootstrap


def _reference_boot(pos, neg, fpr, n_boot, seed):
    """Loop version of bootstrap_intervals: same draws (neg then pos, one block), scalar statistics."""
    pos = torch.as_tensor(pos, dtype=torch.float64).sort().values
    neg = torch.as_tensor(neg, dtype=torch.float64).sort().values
    g = torch.Generator().manual_seed(seed)
    idx_n = torch.randint(neg.numel(), (n_boot, neg.numel()), generator=g)
    idx_p = torch.randint(pos.numel(), (n_boot, pos.numel()), generator=g)
    aucs = torch.tensor([auc(pos[idx_p[b]], neg[idx_n[b]]) for b in range(n_boot)], dtype=torch.float64)
    tprs = torch.tensor([tpr_at_fpr(pos[idx_p[b]], neg[idx_n[b]], fpr)[0] for b in range(n_boot)], dtype=torch.float64)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return tuple(torch.quantile(aucs, q).tolist()), tuple(torch.quantile(tprs, q).tolist())


def test_bootstrap_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    pos = (torch.rand(23, generator=g) * 10).round() / 10 + 0.1  # coarse values: many ties
    neg = (torch.rand(31, generator=g) * 10).round() / 10
    got = bootstrap_intervals(pos, neg, fpr=0.05, n_boot=200, seed=7)
    want = _reference_boot(pos, neg, 0.05, 200, 7)
    for g_ci, w_ci in zip(got, want):
        assert g_ci == pytest.approx(w_ci, abs=1e-12)


def test_bootstrap_deterministic_and_contains_estimate():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(300, generator=g) + 0.5
    neg = torch.randn(300, generator=g)
    (a_lo, a_hi), (t_lo, t_hi) = bootstrap_intervals(pos, neg, fpr=0.05, n_boot=300, seed=1)
    assert a_lo < auc(pos, neg) < a_hi
    assert t_lo < tpr_at_fpr(pos, neg, 0.05)[0] < t_hi
    assert bootstrap_intervals(pos, neg, fpr=0.05, n_boot=300, seed=1) == ((a_lo, a_hi), (t_lo, t_hi))
    assert bootstrap_intervals(pos, neg, fpr=0.05, n_boot=300, seed=2) != ((a_lo, a_hi), (t_lo, t_hi))
    # perfectly separated sets stay separated in every resample
    assert bootstrap_intervals([2.0, 3.0], [0.0, 1.0], n_boot=50)[0] == (1.0, 1.0)


# ----------------------------------------------------------------------------- matching


def test_max_matching_is_exact_not_greedy():
    sim = torch.tensor([[0.9, 0.5], [0.8, 0.1]])
    assert max_matching(sim, 0.4) == 2  # greedy (0.9 first) would stop at 1
    assert max_matching(sim, 0.6) == 1  # only column 0 has pairs >= 0.6
    assert max_matching(sim, 0.95) == 0
    assert max_matching(torch.tensor([[0.5, 0.5, 0.5]]), 0.4) == 1  # one row matches one column


# ----------------------------------------------------------------------------- exposure


def test_exposure_matches_brute_force_and_chunks():
    recon = textures(7, 1)
    refs = textures(11, 2)
    recon[5] = refs[4]  # an exact copy, in a later row block than...
    recon[1] = refs[4]  # ...this one, which must win the tie (lowest index)
    rl = torch.tensor([0, 0, 1, 1, 0, 0, 1])
    fl = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2, 1, 0, 1])  # class 2 has no reconstruction
    e, best = exposure(recon, rl, refs, fl, chunk=3)
    s = ssim_matrix(recon, refs).double()
    s[rl[:, None] != fl[None, :]] = -math.inf
    want = s.max(dim=0).values
    assert torch.allclose(e[fl != 2], want[fl != 2], atol=1e-6)
    rest = (fl != 2) & (torch.arange(11) != 4)  # ref 4's two copies tie: checked next
    assert torch.equal(best[rest], s.argmax(dim=0)[rest])
    assert best[4] == 1 and e[4] == pytest.approx(1.0, abs=1e-5)
    assert e[7] == NO_RECON and best[7] == -1
    e1, best1 = exposure(recon, rl, refs, fl, chunk=1024)  # one block: the same answer
    assert torch.allclose(e, e1, atol=1e-6) and torch.equal(best, best1)


def test_exposure_single_class():
    refs = textures(5, 4)
    recon = torch.cat([refs[2:3], textures(2, 5)])
    e, best = exposure(recon, torch.zeros(3), refs, torch.zeros(5))
    assert e[2] == pytest.approx(1.0, abs=1e-5) and best[2] == 0
    assert (e[[0, 1, 3, 4]] < 0.4).all()


def test_bootstrap_at_audit_scale():
    """5,000 vs 5,000 with 1,000 resamples (the audit's sizes) in one vectorised call; for
    N(0.5, 1) against N(0, 1) the true AUC is Phi(0.5 / sqrt 2) = 0.638."""
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.randn(5000, generator=g) + 0.5, torch.randn(5000, generator=g)
    (a_lo, a_hi), (t_lo, t_hi) = bootstrap_intervals(pos, neg, n_boot=1000, seed=0)
    assert a_lo < 0.638 < a_hi and a_hi - a_lo < 0.04
    assert t_lo < tpr_at_fpr(pos, neg)[0] < t_hi


# ----------------------------------------------------------------------------- calibration pieces


def test_population_match_and_recon_calibrated_scan_by_hand():
    """scan(offset=...) subtracts each reconstruction's offset before the maximum: checked against the
    full SSIM matrix minus the offsets, including a case where calibration picks another reconstruction."""
    refs, recon = textures(6, 20), textures(4, 21)
    recon[2] = refs[1]
    recon[0] = 0.7 * refs[1] + 0.3 * recon[0]  # a looser likeness of ref 1, with no population twin
    rl, fl = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 1, 1, 0])
    pop, pl = textures(5, 22), torch.tensor([0, 0, 1, 1, 0])
    pop[0] = refs[1]  # recon 2's population twin: its offset is 1
    off, idx = population_match(recon, rl, pop, pl)
    s = ssim_matrix(recon, pop).double()
    s[rl[:, None] != pl[None, :]] = -math.inf
    assert torch.allclose(off, s.max(dim=1).values, atol=1e-6) and torch.equal(idx, s.argmax(dim=1))
    assert off[2] == pytest.approx(1.0, abs=1e-5) and idx[2] == 0
    sc = scan(recon, rl, refs, fl, offset=off)
    full = ssim_matrix(recon, refs).double()
    full[rl[:, None] != fl[None, :]] = -math.inf
    cal = full - off[:, None]
    assert torch.allclose(sc.e, full.max(dim=0).values, atol=1e-6)
    assert torch.allclose(sc.e_cal, cal.max(dim=0).values, atol=1e-6)
    assert torch.equal(sc.best_cal, cal.argmax(dim=0))
    assert sc.best[1] == 2 and sc.best_cal[1] == 0  # the raw best (a population twin) loses after calibration
    with pytest.raises(ValueError, match="no image of class"):
        population_match(recon, rl, pop[pl == 0], pl[pl == 0])


def test_calibrated_matching_needs_a_reconstruction_per_image():
    refs = textures(3, 30)
    one = refs.mean(dim=0, keepdim=True)  # one image close-ish to all three
    sims = ssim_matrix(one, refs).double()[0]
    thr = float(sims.min()) - 0.01  # every pair is above it: one reconstruction, three "exposed" images
    assert calibrated_matching(one, torch.zeros(1), refs, torch.zeros(3), thr) == 1
    assert calibrated_matching(refs, torch.zeros(3), refs, torch.zeros(3), 0.5) == 3  # copies: one each
    off = torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64)  # copy 0's calibrated score is 1 - 0.6 = 0.4
    assert calibrated_matching(refs, torch.zeros(3), refs, torch.zeros(3), 0.5, recon_offset=off) == 2
    assert calibrated_matching(refs, torch.zeros(3), refs, torch.zeros(3), 0.5,
                               ref_offset=torch.tensor([0.0, 0.7, 0.0], dtype=torch.float64)) == 2
