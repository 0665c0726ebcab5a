"""Membership inference scores (loss, margin, offline LiRA), their summaries and the 0.1 % rule."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from tldr_core.attack.data import Split
from tldr_core.scoring.membership import bootstrap_intervals, bootstrap_intervals_at
from tldr_core.scoring.mia import (fpr_tag, membership_from_logits, score_membership, size_matched, summarize,
                                   unresolved_reason)
from tldr_core.scoring.mia_scores import class_logits, lira_scores, loss_scores, margin_scores


def _linear():
    """Flatten then Linear(2, 3): W = [[1, 0], [0, 1], [1, 1]], b = [0, 0, -1]."""
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return nn.Sequential(nn.Flatten(), lin)


def test_loss_and_margin_on_a_linear_model_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    logits = class_logits(_linear(), x)  # [1, 2, 2] and [0, 0, -1]
    assert logits.tolist() == [[1.0, 2.0, 2.0], [0.0, 0.0, -1.0]]
    labels = torch.tensor([0, 2])
    e = math.e
    want_loss = [1 - math.log(e + 2 * e ** 2), -1 - math.log(2 + e ** -1)]
    want_margin = [1 - (2 + math.log(2)), -1 - math.log(2)]  # f_y - log(sum of the other exps)
    assert loss_scores(logits, labels).tolist() == pytest.approx(want_loss, abs=1e-12)
    assert margin_scores(logits, labels).tolist() == pytest.approx(want_margin, abs=1e-12)
    # the margin is log p_y - log(1 - p_y)
    p = torch.softmax(logits, 1)[[0, 1], labels]
    assert margin_scores(logits, labels).tolist() == pytest.approx(torch.log(p / (1 - p)).tolist(), abs=1e-12)


def test_margin_keeps_resolving_where_the_loss_rounds_to_zero():
    logits = torch.tensor([[60.0, 0.0], [70.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    loss = loss_scores(logits, labels)
    assert loss[0] == loss[1] and -1e-25 < float(loss[0]) <= 0.0  # both log(1 - 1e-26...): a tie
    assert margin_scores(logits, labels).tolist() == pytest.approx([60.0, 70.0])


def test_scores_refuse_bad_shapes():
    with pytest.raises(ValueError, match="labels outside"):
        margin_scores(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="logits must be"):
        loss_scores(torch.zeros(2, 3), torch.tensor([0]))


# ----------------------------------------------------------------------------- LiRA

REFS = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, 1.0], [3.0, 2.0, -1.0], [4.0, 2.0, 1.0]], dtype=torch.float64)
PHI = torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64)
# by hand: mu = (2.5, 1, 0); unbiased variances (5/3, 4/3, 4/3); pooled variance 13/9


def test_lira_fixed_variance_by_hand():
    out = lira_scores(PHI, REFS)  # K = 4 < 64: one pooled sigma
    assert out.fixed_variance and out.k == 4
    assert out.mu.tolist() == pytest.approx([2.5, 1.0, 0.0])
    sigma = math.sqrt(13 / 9)
    assert out.sigma.tolist() == pytest.approx([sigma] * 3)
    z = [1.5 / sigma, 0.0, -2.0 / sigma]
    assert out.z.tolist() == pytest.approx(z)
    # score = -log(1 - Phi(z)) = -log sf(z)
    assert out.score.tolist() == pytest.approx([-norm.logsf(v) for v in z], rel=1e-10)
    assert out.score[1] == pytest.approx(math.log(2))  # z = 0: p-value 1/2


def test_lira_per_example_variance_by_hand():
    out = lira_scores(PHI, REFS, per_example_min_k=4)
    assert not out.fixed_variance
    assert out.sigma.tolist() == pytest.approx([math.sqrt(5 / 3), math.sqrt(4 / 3), math.sqrt(4 / 3)])
    z = [1.5 / math.sqrt(5 / 3), 0.0, -2.0 / math.sqrt(4 / 3)]
    assert out.score.tolist() == pytest.approx([-norm.logsf(v) for v in z], rel=1e-10)


def test_lira_far_tail_does_not_saturate():
    # z = 40 and 50: Phi(z) is 1.0 in float64, the -log p-value still orders them
    refs = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)  # mu 0, sigma sqrt(2)
    out = lira_scores(torch.tensor([40.0, 50.0]) * math.sqrt(2), refs)
    assert out.z.tolist() == pytest.approx([40.0, 50.0])
    assert out.score.tolist() == pytest.approx([-norm.logsf(40.0), -norm.logsf(50.0)], rel=1e-9)
    assert torch.isfinite(out.score).all() and out.score[1] > out.score[0]


def test_lira_on_sampled_gaussians_finds_the_shifted_images():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(200, generator=g) * 3  # images differ a lot in their typical margin
    refs = mu + torch.randn(8, 200, generator=g)
    phi = mu + torch.randn(200, generator=g)
    phi[:20] += 4.0  # "members": four sigmas above their own references
    out = lira_scores(phi, refs)
    assert len(set(torch.topk(out.score, 20).indices.tolist()) & set(range(20))) >= 16
    # the raw margin alone cannot see them through the spread of mu
    assert len(set(torch.topk(phi, 20).indices.tolist()) & set(range(20))) <= 12


def test_lira_needs_two_references():
    with pytest.raises(ValueError, match="at least 2"):
        lira_scores(PHI, REFS[:1])


# ----------------------------------------------------------------------------- summaries and the 0.1 % rule


def test_fpr_tags():
    assert [fpr_tag(f) for f in (0.01, 0.001, 0.05, 0.005)] == ["1", "01", "5", "05"]


def test_bootstrap_at_several_fprs_uses_the_same_resamples():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(150, generator=g) + 1, torch.randn(1200, generator=g)
    auc_ci, cis = bootstrap_intervals_at(pos, neg, fprs=(0.01, 0.001), n_boot=200, seed=4)
    assert (auc_ci, cis[0]) == bootstrap_intervals(pos, neg, fpr=0.01, n_boot=200, seed=4)
    assert (auc_ci, cis[1]) == bootstrap_intervals(pos, neg, fpr=0.001, n_boot=200, seed=4)
    assert cis[0] != cis[1]


def test_tpr_at_01_percent_is_nan_below_1000_heldout_images():
    assert unresolved_reason(0.001, 1000) == ""
    assert unresolved_reason(0.001, 999).startswith("needs >= 1000 held-out images; H' has 999")
    g = torch.Generator().manual_seed(2)
    s = summarize("margin", torch.randn(500, generator=g) + 1, torch.randn(500, generator=g), n_boot=50)
    assert s.tpr[0] == s.tpr[0] and math.isnan(s.tpr[1]) and all(math.isnan(v) for v in s.tpr_ci[1])
    assert s.unresolved == {0.001: unresolved_reason(0.001, 500)}
    m = s.metrics()
    assert math.isnan(m["mia_margin_tpr_01"]) and not math.isnan(m["mia_margin_tpr_1"])
    # with 1000 held-out images it is a number: k = 1, the threshold is the second largest
    neg = torch.arange(1000, dtype=torch.float64)
    s = summarize("margin", torch.tensor([997.5, 998.5, 999.5, 5.0]), neg, n_boot=20)
    assert s.threshold[1] == 998.0 and s.tpr[1] == pytest.approx(0.5)


def _logits_for(margins):
    """Two-class logits whose margin for label 0 is exactly ``margins``."""
    m = torch.as_tensor(margins, dtype=torch.float64)
    return torch.stack([m, torch.zeros_like(m)], dim=1), torch.zeros(len(m), dtype=torch.int64)


def test_result_metrics_notes_ranks_and_csv(tmp_path):
    t_logits, t_lab = _logits_for([3.0, 1.0, 2.0, 5.0])
    h_logits, h_lab = _logits_for([0.0, 1.5, -1.0, 0.5])
    refs_t = [_logits_for([0.0, 1.0, 2.0, 0.0])[0], _logits_for([1.0, 1.0, 2.0, 2.0])[0]]
    refs_h = [_logits_for([0.0, 1.0, -1.0, 0.0])[0], _logits_for([1.0, 2.0, 0.0, 0.0])[0]]
    res = membership_from_logits(t_logits, t_lab, h_logits, h_lab, ref_train_logits=refs_t,
                                 ref_heldout_logits=refs_h, heldout_index=torch.tensor([7, 8, 9, 11]), n_boot=30)
    assert res.best == "lira" and res.lira_k == 2 and res.lira_fixed_variance
    m = res.metrics()
    assert m["mia_margin_auc"] == pytest.approx(15 / 16)  # pairs T > H': 4 + 3 + 4 + 4, by hand
    assert {"mia_loss_auc", "mia_lira_tpr_1_lo", "mia_lira_tpr_01", "mia_lira_k"} <= set(m)
    assert m["mia_n_train"] == 4 and m["mia_lira_fixed_variance"] == 1.0
    assert set(res.notes()) >= {"mia_lira_tpr_01", "mia_lira_tpr_1", "mia_margin_tpr_1_hi"}  # 4 held-out images
    # margins minus the references' means: 2.5, -0.0, 0, 4 -> ranks 2, 3 or 4 (ties by index), 1
    assert res.ranks().tolist() == [2, 3, 4, 1]
    assert res.ranks("margin").tolist() == [2, 4, 3, 1]
    rows = res.rows()
    assert [(r["split"], r["index"]) for r in rows[:4]] == [("train", 3), ("train", 0), ("train", 1), ("train", 2)]
    assert rows[4]["split"] == "heldout" and rows[4]["index"] in (7, 8, 9, 11) and rows[4]["lira_rank"] is None
    path = res.write_csv(tmp_path / "membership.csv")
    back = list(csv.DictReader(path.open()))
    assert back[0]["lira_rank"] == "1" and back[-1]["lira_rank"] == "" and "lira_z" in back[0]
    assert float(back[0]["margin_score"]) == pytest.approx(5.0)


def test_score_membership_size_matches_and_refuses_one_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    train = Split(torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    held = Split(torch.rand(9, 1, 2, 2), torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0]))
    assert size_matched(train.labels, held.labels).tolist() == [0, 1, 2, 4, 5, 6]
    res = score_membership(model, train, held, n_boot=10)
    assert res.heldout_index.tolist() == [0, 1, 2, 4, 5, 6] and "lira" not in res.summaries and res.best == "margin"
    want = margin_scores(class_logits(model, held.images[[0, 1, 2, 4, 5, 6]]), held.labels[[0, 1, 2, 4, 5, 6]])
    assert torch.equal(res.scores["margin"][1], want)
    with pytest.raises(ValueError, match="at least 2 reference"):
        score_membership(model, train, held, references=[model])
