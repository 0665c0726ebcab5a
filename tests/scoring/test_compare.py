"""The paired comparison of two versions (tldr_core.scoring.compare): hand-computed AUC / TPR
differences, the paired bootstrap against a plain loop over the same draws, pairing (two equal versions
have a zero-width interval), and what counts as a regression."""
from __future__ import annotations

import math

import pytest
import torch

from tldr_core.scoring.compare import (AxisComparison, Comparison, Difference, compare_axis, level_rose,
                                       paired_bootstrap, verdict_levels)
from tldr_core.scoring.membership import auc, tpr_at_fpr


def test_hand_computed_auc_difference():
    # a: pairs (1>0, 1<3, 2>0, 2<3) -> AUC 2/4 = 0.5; b: every T score above every H' score -> 1.0
    d = paired_bootstrap(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), torch.tensor([5.0, 6.0]),
                         torch.tensor([0.0, 3.0]), n_boot=200)
    assert (d["auc"].baseline, d["auc"].candidate, d["auc"].delta) == (0.5, 1.0, 0.5)
    assert -1.0 <= d["auc"].ci[0] <= 0.5 <= d["auc"].ci[1] <= 1.0
    assert math.isnan(d["tpr"].delta) and "needs >= 100 held-out images" in d["tpr"].note  # |H'| = 2
    assert not d["tpr"].leakier


def test_equal_versions_have_a_zero_width_interval():
    """Paired: both versions see the same draw, so equal scores give a difference of exactly 0 in every
    draw (two independent bootstraps would not)."""
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.rand(150, generator=g), torch.rand(120, generator=g)
    d = paired_bootstrap(pos, neg, pos.clone(), neg.clone(), n_boot=300)
    for k in ("auc", "tpr"):
        assert d[k].delta == 0.0 and d[k].ci == (0.0, 0.0) and not d[k].leakier


def test_matches_a_plain_loop_over_the_same_draws():
    g = torch.Generator().manual_seed(2)
    p, q, n_boot = 30, 100, 60
    pa, na = torch.rand(p, generator=g), torch.rand(q, generator=g)
    pb, nb = pa + 0.3 * torch.rand(p, generator=g), na + 0.05 * torch.rand(q, generator=g)
    got = paired_bootstrap(pa, na, pb, nb, n_boot=n_boot, seed=7)
    draws = torch.Generator().manual_seed(7)  # one block: T's indices, then H''s, as the function draws them
    it, ih = torch.randint(p, (n_boot, p), generator=draws), torch.randint(q, (n_boot, q), generator=draws)
    d_auc, d_tpr = [], []
    for b in range(n_boot):
        t, h = it[b], ih[b]
        d_auc.append(auc(pb[t], nb[h]) - auc(pa[t], na[h]))
        d_tpr.append(tpr_at_fpr(pb[t], nb[h], 0.01)[0] - tpr_at_fpr(pa[t], na[h], 0.01)[0])
    qs = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for k, ds in (("auc", d_auc), ("tpr", d_tpr)):
        want = torch.quantile(torch.tensor(ds, dtype=torch.float64), qs)
        assert got[k].ci == pytest.approx((float(want[0]), float(want[1])), abs=1e-12), k
    assert got["auc"].delta == pytest.approx(auc(pb, nb) - auc(pa, na))


def test_a_leakier_candidate_excludes_zero_and_a_clean_one_does_not():
    g = torch.Generator().manual_seed(3)
    t_a, h_a = torch.randn(200, generator=g), torch.randn(200, generator=g)
    noise = 0.1 * torch.randn(400, generator=g)
    train = ({i: float(v) for i, v in enumerate(t_a)}, {i: float(v + 1.0 + noise[i]) for i, v in enumerate(t_a)})
    held = ({i: float(v) for i, v in enumerate(h_a)}, {i: float(v + noise[200 + i]) for i, v in enumerate(h_a)})
    leaky = compare_axis("membership.loss", train, held, n_boot=400)
    assert leaky.differences["auc"].ci[0] > 0 and leaky.leakier
    retrain = compare_axis("membership.loss", (train[0], {i: v + float(noise[i]) for i, v in train[0].items()}),
                           held, n_boot=400)
    lo, hi = retrain.differences["auc"].ci
    assert lo < 0 < hi and not retrain.leakier


def test_different_images_cannot_be_paired():
    with pytest.raises(ValueError, match="different images"):
        compare_axis("exposure.tldr", ({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0}), ({0: 0.0}, {0: 0.0}))


def test_regression_rule():
    flat = Difference("auc", 0.6, 0.62, 0.02, (-0.01, 0.05))
    up = Difference("auc", 0.6, 0.8, 0.2, (0.1, 0.3))
    assert level_rose("LOW", "MEDIUM") and not level_rose("HIGH", "MEDIUM") and not level_rose("not run", "HIGH")
    same = Comparison([AxisComparison("exposure.tldr", {"auc": flat}, 10, 10)],
                      verdict_levels({"reconstruction": "LOW", "membership": "MEDIUM"},
                                     {"reconstruction": "LOW", "membership": "LOW"}))
    assert not same.regression and same.regressed_axes == []
    worse = Comparison([AxisComparison("membership.margin", {"auc": up}, 10, 10)],
                       {"membership": ("LOW", "MEDIUM")})
    assert worse.regressed_axes == ["membership.margin", "verdict.membership"]
    assert worse.as_dict()["axes"][0]["differences"]["auc"]["ci_low"] == 0.1
