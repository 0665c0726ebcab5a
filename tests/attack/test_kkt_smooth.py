"""The KKT attack on a smooth-activation classifier: nothing to smooth, and at a stationary point of
CE + weight decay the training set itself solves the attack's equation with λ = m (1 − p_y) / (wd·n)."""
import pytest
import torch

from tldr_core.attack import kkt
from tldr_core.attack.full_batch import lbfgs_polish
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.models import FC

pytestmark = pytest.mark.usefixtures("one_thread")


def _softplus_fc(dtype=torch.float64) -> FC:
    torch.manual_seed(0)
    return FC((1, 4, 4), 3, widths=(6,), activation="softplus", beta=10.0).to(dtype).eval().requires_grad_(False)


def test_training_set_of_a_stationary_softplus_model_solves_the_kkt_equation():
    model, wd = _softplus_fc(), 0.05
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(6) % 3
    info = lbfgs_polish(model, x, y, wd, steps=2000, target=1e-7, log=lambda s: None)
    assert info["polish_residual"] <= 1e-7
    p_y = torch.softmax(model(x), 1).gather(1, y[:, None]).squeeze(1)
    lam = len(x) * (1 - p_y) / (wd * len(x))  # the attack divides Σ λ∇m by m = len(x) candidates
    theta = kkt.stationarity_parameters(model)
    with kkt.smooth_relu(model, alpha=100.0):  # swaps no module: softplus is not a ReLU
        assert not any(isinstance(m, kkt.SmoothReLU) for m in model.modules())
        assert kkt.stationarity_loss(model, theta, x, y, lam, soft=True).item() < 1e-10
        assert kkt.stationarity_loss(model, theta, x, y, 0.9 * lam, soft=True).item() > 1e-4


def test_run_kkt_on_a_softplus_model_lowers_its_residual():
    model = _softplus_fc(torch.float32)
    cfg = KKTConfig(steps=60, per_class=2, lr=0.02, log_every=59)
    out = kkt.run_kkt(model, 3, (1, 4, 4), cfg, train_per_class=1, log=None)
    first, last = out.history[0]["loss_residual"], out.history[-1]["loss_residual"]
    assert out.steps == 60 and last < 0.9 * first and out.images.shape == (6, 1, 4, 4)
