"""The stationarity diagnostic: ~0 at an exact stationary point and O(1) far from one, a residual checked
by hand on a one-tensor model, and the no-weight-decay form recovering known coefficients λ ≥ 0."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tldr_core.attack.data import Split
from tldr_core.attack.full_batch import lbfgs_polish, wd_residual
from tldr_core.attack.models import MLP
from tldr_core.scoring.stationarity import (Stationarity, StationarityError, margin_gram, nnls_gram, stationarity,
                                            weight_decay_of)

pytestmark = pytest.mark.usefixtures("one_thread")


def _split(n=12, k=3, side=3, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.rand(n, 1, side, side, generator=g), torch.arange(n) % k)


def _linear(k=3, side=3, seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP((1, side, side), k, hidden=0).double().eval().requires_grad_(False)


def _solve_exactly(model: nn.Module, data: Split, wd: float) -> None:
    """L-BFGS in float64 on mean CE + (wd/2)‖θ‖² (strongly convex for a linear model), by plain torch,
    independently of the code under test."""
    params = [p.requires_grad_(True) for p in model.parameters()]
    x, y = data.images.double(), data.labels
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * wd * sum(p.pow(2).sum() for p in params)
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    model.requires_grad_(False)


def test_exact_stationary_point_has_residual_near_zero_and_init_of_order_one():
    data, wd = _split(), 0.1
    model = _linear()
    at_init = stationarity(model, data, {"settings": {"weight_decay": wd}})
    assert 0.3 < at_init.residual < 30 and at_init.form == "weight_decay"
    _solve_exactly(model, data, wd)
    res = stationarity(model, data, {"settings": {"weight_decay": wd}})
    assert res.residual < 1e-6 and res.cosine > 1 - 1e-9
    assert set(res.per_layer) == {"out"} and set(res.per_tensor) == {"out.weight", "out.bias"}
    assert res.metrics()["stationarity_residual_out"] < 1e-6 and res.explained > 1 - 1e-12
    assert "holds to 100.00 %" in res.sentence()
    assert wd_residual(model, data.images, data.labels, wd) == pytest.approx(res.residual, abs=1e-12)


class OneTensor(nn.Module):
    """logits = W x, W (2, 1): one parameter tensor, no bias."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_residual_by_hand_on_a_one_tensor_model():
    # one image x = 1 of class 0, W = [[1], [0]]: p0 = e/(e+1); ∇W CE = (p − e_0) x = (p0 − 1, 1 − p0)
    model = OneTensor([[1.0], [0.0]]).eval()
    data = Split(torch.ones(1, 1, 1, 1), torch.tensor([0]))
    wd = 0.5
    p0 = math.e / (math.e + 1)
    grad = (p0 - 1, 1 - p0)
    expected = math.hypot(grad[0] + wd * 1.0, grad[1] + wd * 0.0) / (wd * 1.0)   # = 0.709...
    res = stationarity(model, data, weight_decay=wd)
    assert res.residual == pytest.approx(expected, rel=1e-12)
    assert res.per_tensor == {"w": pytest.approx(expected, rel=1e-12)} and res.per_layer["w"] == res.residual
    # cosine of wd·θ = (0.5, 0) with −∇CE = (1 − p0, p0 − 1): 1/√2
    assert res.cosine == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert res.holds_percent == pytest.approx(100 * (1 - expected))


def _two_class_fixed_point(lam):
    """A 2-class linear model whose weights are exactly Σ λᵢ ∇θ mᵢ (hard margin): for two classes
    ∇W_y m = x, ∇W_other m = −x and ∇b = ±1 whatever θ is, so θ := Σ λᵢ ∇θ mᵢ is a fixed point."""
    data = _split(n=len(lam), k=2, side=4, seed=3)
    model = _linear(k=2, side=4)
    x = data.images.double().flatten(1)
    sign = torch.where(data.labels[:, None] == torch.arange(2), 1.0, -1.0).double()
    with torch.no_grad():
        model.out.weight.copy_(torch.einsum("j,jc,jd->cd", lam, sign, x))
        model.out.bias.copy_(torch.einsum("j,jc->c", lam, sign))
    return model, data


def test_margin_form_recovers_known_nonnegative_lambdas():
    lam = torch.tensor([0.7, 0.0, 1.3, 0.2, 0.0, 2.5], dtype=torch.float64)
    model, data = _two_class_fixed_point(lam)
    res = stationarity(model, data, {"settings": {"weight_decay": 0.0}})
    assert res.form == "margin" and res.residual < 1e-8 and res.cosine > 1 - 1e-12
    assert torch.allclose(torch.tensor(res.lambdas, dtype=torch.float64), lam, atol=1e-8)
    assert res.metrics()["stationarity_lambda_support"] == 4.0
    # several chunks of per-example gradients give the same Gram matrix as one
    g1, b1 = margin_gram(model, data.images, data.labels)
    g2, b2 = margin_gram(model, data.images, data.labels, memory_bytes=2 * 8 * 34 * 2)  # 2 rows per chunk
    assert torch.allclose(g1, g2, atol=1e-12) and torch.allclose(b1, b2, atol=1e-12)


def test_margin_form_far_from_the_premise_and_nnls_against_scipy():
    """A random linear model: its λ ≥ 0 fit leaves most of θ unexplained, and the fitted λ are the ones
    scipy's NNLS finds on the explicit per-example gradient matrix."""
    scipy_nnls = pytest.importorskip("scipy.optimize").nnls
    model, data = _linear(k=2, side=4, seed=5), _split(n=6, k=2, side=4, seed=3)
    res = stationarity(model, data, weight_decay=0.0)
    assert res.residual > 0.5
    gram, b = margin_gram(model, data.images, data.labels)
    chol = torch.linalg.cholesky(gram)  # ‖θ − Jᵀλ‖² = ‖Rλ − R⁻ᵀb‖² + const with G = RᵀR
    rhs = torch.linalg.solve_triangular(chol, b.unsqueeze(1), upper=False).squeeze(1)
    expected, _ = scipy_nnls(chol.T.numpy(), rhs.numpy())
    assert torch.allclose(torch.tensor(res.lambdas, dtype=torch.float64), torch.from_numpy(expected), atol=1e-8)


def test_nnls_gram_matches_a_hand_solved_problem():
    # J rows (1, 0) and (1, 1); θ = (2, −1): unconstrained λ = (3, −1); with λ ≥ 0: λ2 = 0, λ1 = 2
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    theta = torch.tensor([2.0, -1.0], dtype=torch.float64)
    lam = nnls_gram(j @ j.T, j @ theta)
    assert torch.allclose(lam, torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_refusals_and_meta():
    model, data = _linear(), _split()
    assert weight_decay_of({"settings": {"weight_decay": 5e-3}}) == 5e-3 and weight_decay_of({}) is None
    with pytest.raises(StationarityError, match="weight decay is unknown"):
        stationarity(model, data, {})
    with pytest.raises(StationarityError, match="refused above"):
        stationarity(model, data, weight_decay=0.0, max_np=10)
    with pytest.raises(StationarityError, match="needs weight decay > 0"):
        stationarity(model, data, weight_decay=0.0, form="weight_decay")
    assert isinstance(stationarity(model, data, weight_decay=0.0), Stationarity)


def test_lbfgs_polish_reaches_the_target_on_a_float32_model():
    data, wd = _split(), 0.1
    torch.manual_seed(0)
    model = MLP((1, 3, 3), 3, hidden=0).eval().requires_grad_(False)  # float32, as trained models are
    info = lbfgs_polish(model, data.images, data.labels, wd, steps=200, target=1e-4, log=lambda s: None)
    assert info["polish_residual"] <= 1e-4 and 0 < info["polish_steps"] <= 200
    assert model.out.weight.dtype == torch.float32
    assert stationarity(model, data, weight_decay=wd).residual == pytest.approx(info["polish_residual"], rel=1e-9)


def test_margin_gram_on_a_cnn_matches_plain_autograd(tiny_cnn):
    """BatchNorm (eval) and dropout under vmap: the Gram matrix's entries are the dot products of
    per-image hard-margin gradients computed one image at a time by plain autograd."""
    data = _split(n=4, k=3, side=12, seed=2)
    gram, b = margin_gram(tiny_cnn, data.images, data.labels, memory_bytes=1 << 16)  # several chunks
    model = tiny_cnn.double().requires_grad_(True)
    rows = []
    for i in range(4):
        logits = model(data.images[i:i + 1].double())[0]
        y = int(data.labels[i])
        m = logits[y] - torch.cat([logits[:y], logits[y + 1:]]).max()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(m, list(model.parameters()))]))
    j = torch.stack(rows)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(gram, j @ j.T, rtol=1e-10) and torch.allclose(b, j @ theta, rtol=1e-10)
