"""Each loss term against a value computed by hand on tiny tensors; Grad's three forms agree."""
import math

import pytest
import torch
import torch.nn.functional as F

from tldr_core.attack import losses
from tldr_core.attack.config import AttackConfig, LossWeights
from tldr_core.attack.models import MLP


def test_kl_hot_vector_against_uniform_output_is_log2():
    p = torch.tensor([[1.0, 0.0]])
    assert losses.kl(p, torch.zeros(1, 2)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_kl_soft_vector_by_hand():
    p = torch.tensor([[0.25, 0.75]])
    logits = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.kl(p, logits).item() == pytest.approx(expected, abs=1e-6)


def test_ce_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) + -math.log(3 / 4)) / 2
    assert losses.ce(logits, torch.tensor([0, 0])).item() == pytest.approx(expected, abs=1e-6)


def test_cos_mean_over_distinct_pairs():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # pairs (0,1)=0, (0,2)=1, (1,2)=0, each counted twice, over B(B-1)=6
    assert losses.cos(f).item() == pytest.approx(2 / 6, abs=1e-6)


def test_ortho_identity_is_zero_and_duplicates_are_penalised():
    assert losses.ortho(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-7)
    dup = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # normalised Gram = all ones: two off-diagonal 1s over 4
    assert losses.ortho(dup).item() == pytest.approx(0.5, abs=1e-6)


def test_var_total_variation_by_hand():
    img = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # vertical edge: dw = 1 twice, dh = 0
    assert losses.var(img).item() == pytest.approx(2.0)
    two = torch.cat([img, torch.zeros_like(img)])  # averaged over the batch
    assert losses.var(two).item() == pytest.approx(1.0)


def test_pix_penalises_only_outside_unit_interval():
    img = torch.tensor([[[[-0.5, 1.5], [0.5, 1.0]]]])
    assert losses.pix(img).item() == pytest.approx(1.0)
    assert losses.pix(torch.rand(2, 1, 4, 4)).item() == 0.0


def _linear_model():
    torch.manual_seed(1)
    return MLP((1, 3, 3), 4, hidden=0).eval().requires_grad_(False)


def test_grad_norm_linear_model_closed_form():
    # For logits = W x + b: dL/dW = (p - y) x^T, dL/db = p - y  =>  ||grad|| = ||p - y|| sqrt(||x||^2 + 1)
    model = _linear_model()
    x = torch.rand(5, 1, 3, 3)
    y = torch.tensor([0, 1, 2, 3, 0])
    p = F.softmax(model(x), dim=1)
    expected = (p - F.one_hot(y, 4)).norm(dim=1) * torch.sqrt(x.flatten(1).pow(2).sum(1) + 1)
    for fn in (losses.grad_norm_per_sample, losses.grad_norm_loop, losses.grad_norm_ghost):
        torch.testing.assert_close(fn(model, x, y), expected, atol=1e-5, rtol=1e-5)


def _random_batch_norm(model):
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm is the identity)."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("scope", ["head", "all"])
def test_per_sample_grad_equals_loop_reference(tiny_cnn, scope):
    _random_batch_norm(tiny_cnn)
    x = torch.rand(6, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = losses.grad_norm_loop(tiny_cnn, x, y, scope)
    torch.testing.assert_close(losses.grad_norm_per_sample(tiny_cnn, x, y, scope), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses.grad_norm_ghost(tiny_cnn, x, y, scope), ref, atol=1e-5, rtol=1e-5)
    # batch-level form: the norm of the mean gradient is at most the mean of the norms (triangle inequality)
    assert losses.grad_norm_batch(tiny_cnn, x, y, scope).item() <= ref.mean().item() + 1e-6


@pytest.mark.parametrize("scope", ["head", "all"])
def test_ghost_grad_image_gradient_equals_loop(tiny_cnn, scope):
    _random_batch_norm(tiny_cnn)
    # The attack differentiates Grad w.r.t. the images: the closed forms must carry the same gradient.
    x0 = torch.rand(5, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 0, 1])
    grads = []
    for fn in (losses.grad_norm_loop, losses.grad_norm_ghost):
        x = x0.clone().requires_grad_(True)
        fn(tiny_cnn, x, y, scope).pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_ghost_grad_refuses_layers_without_a_closed_form():
    model = MLP((1, 3, 3), 4, hidden=5).eval().requires_grad_(False)
    model.fc[1] = torch.nn.LayerNorm(5)  # parameters the per-layer formulas do not cover
    with pytest.raises(ValueError, match="does not support LayerNorm.*per-sample"):
        losses.grad_norm_ghost(model, torch.rand(2, 1, 3, 3), torch.tensor([0, 1]), "head")


def test_ghost_grad_refuses_training_mode_batch_norm(tiny_cnn):
    tiny_cnn.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            losses.grad_norm_ghost(tiny_cnn, torch.rand(2, 1, 12, 12), torch.tensor([0, 1]), "all")
    finally:
        tiny_cnn.eval()


@pytest.mark.parametrize("mode", ["per-sample", "ghost", "loop", "batch"])
def test_grad_term_is_differentiable_wrt_images(tiny_cnn, mode):
    x = torch.rand(4, 1, 12, 12, requires_grad=True)
    losses.grad_term(tiny_cnn, x, torch.tensor([0, 1, 2, 0]), mode).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_cnn.parameters())  # the audited classifier stays frozen


def test_fgsm_perturbation_bounded_and_increases_loss(tiny_cnn):
    x = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 3, (8,))
    xp = losses.perturb(tiny_cnn, x, y, 0.03, "fgsm")
    assert (xp - x).abs().max().item() == pytest.approx(0.03, abs=1e-6)
    assert F.cross_entropy(tiny_cnn(xp), y) > F.cross_entropy(tiny_cnn(x), y)
    xr = losses.perturb(tiny_cnn, x, y, 0.03, "random", generator=torch.Generator().manual_seed(0))
    assert torch.allclose((xr - x).abs(), torch.full_like(x, 0.03))


def test_inversion_uses_four_terms_and_reconstruction_nine(tiny_cnn):
    x = torch.rand(4, 1, 12, 12, requires_grad=True)
    v = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    y = v.argmax(1)
    inv = losses.compute_terms(tiny_cnn, x, v, y, AttackConfig(mode="inversion"))
    rec = losses.compute_terms(tiny_cnn, x, v, y, AttackConfig(mode="reconstruction"))
    assert set(inv) == {"kl", "ce", "cos", "ortho"}
    assert set(rec) == set(LossWeights.names())
    w = LossWeights()
    assert losses.weighted_total(rec, w).item() == pytest.approx(sum(getattr(w, k) * rec[k].item() for k in rec), rel=1e-5)


@pytest.mark.parametrize("mode", ["per-sample", "ghost", "loop", "batch"])
def test_grad_from_shared_trunk_equals_grad_from_images(tiny_cnn, mode):
    # compute_terms hands Grad the trunk output it already computed: same value, same image gradient
    _random_batch_norm(tiny_cnn)
    x0 = torch.rand(4, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 0])
    results = []
    for shared in (False, True):
        x = x0.clone().requires_grad_(True)
        trunk = tiny_cnn.trunk(x) if shared else None
        g = losses.grad_term(tiny_cnn, x, y, mode, "head", trunk=trunk)
        g.backward()
        results.append((g.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_compute_terms_grad_equals_standalone_grad(tiny_cnn):
    from tldr_core.attack.config import AttackConfig

    x = torch.rand(4, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 0])
    v = F.one_hot(y, 3).float()
    terms = losses.compute_terms(tiny_cnn, x, v, y, AttackConfig())
    torch.testing.assert_close(terms["grad"], losses.grad_term(tiny_cnn, x, y, "ghost", "head"))
    torch.testing.assert_close(terms["ce"], F.cross_entropy(tiny_cnn(x), y))


def test_bn_stats_by_hand():
    """Channel means off by (3, 4): norm 5; variances equal (a batch built to have them exactly)."""
    z = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])                 # (B=2, C=2): mean 0, biased var 1
    mu, var = torch.tensor([0.5, -2.0]), torch.tensor([4.0, 0.25])
    a = mu + var.sqrt() * z
    assert losses.bn_stats([a], [mu], [var]).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.bn_stats([a], [mu - torch.tensor([3.0, 4.0])], [var]).item() == pytest.approx(5.0, abs=1e-6)
    # a (B, C, H, W) input: statistics over batch and positions; var 1 -> 4 in one channel adds |3|
    a4 = a[:, :, None, None].expand(2, 2, 2, 3)
    assert losses.bn_stats([a4, a], [mu, mu], [var + torch.tensor([3.0, 0.0]), var]).item() == pytest.approx(3.0, abs=1e-6)


def test_weighted_total_accepts_a_mapping_with_the_prior():
    terms = {"kl": torch.tensor(2.0), "bn": torch.tensor(3.0)}
    assert losses.weighted_total(terms, {"kl": 0.5, "bn": 0.1}).item() == pytest.approx(1.3)
    assert losses.weighted_total({"kl": torch.tensor(2.0)}, LossWeights(kl=0.25)).item() == pytest.approx(0.5)
