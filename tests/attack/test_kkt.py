"""Stationarity (KKT) reconstruction: the loss vanishes exactly on weights built as Σ λ ∇θ m(x),
the smoothed ReLU changes gradients only, settings are validated, and a tiny run behaves."""
import pytest
import torch
from torch import nn

from tldr_core.attack import kkt
from tldr_core.attack.config import ConfigError
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.models import FC, MLP, PaperCNN
from tldr_core.attack.train import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread")


def _fc(dtype=torch.float64) -> FC:
    torch.manual_seed(0)
    return FC((1, 4, 4), 3, widths=(6, 5)).to(dtype).eval().requires_grad_(False)


def _data(m=6, n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, 1, 4, 4, generator=g, dtype=dtype)
    y = torch.arange(m) % n
    lam = torch.rand(m, generator=g, dtype=dtype) + 0.5
    return x, y, lam


# ---- (a) the loss is zero exactly where the equation holds ----------------------------------------

def test_two_class_linear_model_built_by_hand_is_a_fixed_point():
    """Linear 2-class model: ∇W_y m = x, ∇W_other m = −x, ∇b = ±1, independent of θ, so the weights
    W_c = (1/m) Σ λ_j (±x_j) satisfy the equation at themselves."""
    model = MLP((1, 2, 2), 2, hidden=0).double().eval().requires_grad_(False)
    x, y, lam = _data(m=4, n=2)
    x = x[:, :, :2, :2].contiguous()
    sign = torch.where(y[:, None] == torch.arange(2), 1.0, -1.0).double()      # (m, 2)
    w = torch.einsum("j,jc,jd->cd", lam, sign, x.flatten(1)) / len(x)
    b = torch.einsum("j,jc->c", lam, sign) / len(x)
    with torch.no_grad():
        model.out.weight.copy_(w)
        model.out.bias.copy_(b)
    theta = kkt.stationarity_parameters(model)
    assert kkt.stationarity_loss(model, theta, x, y, lam).item() < 1e-20
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.3
    assert kkt.stationarity_loss(model, theta, x2, y, lam).item() > 1e-4


@pytest.mark.parametrize("soft", [False, True])
def test_loss_vanishes_on_weights_built_from_gradients_and_not_after_perturbing(soft):
    """Target θ := (1/m) Σ λ ∇θ m at θ0, computed per candidate by plain autograd on the module
    (not by the code under test); the loss with gradients taken at θ0 must vanish."""
    model = _fc()
    x, y, lam = _data()
    theta0 = dict(model.named_parameters())
    target = {k: torch.zeros_like(v) for k, v in theta0.items()}
    model.requires_grad_(True)
    for j in range(len(x)):
        logits = model(x[j:j + 1])[0]
        others = torch.cat([logits[:y[j]], logits[y[j] + 1:]])
        m = logits[y[j]] - (torch.logsumexp(others, 0) if soft else others.max())
        for (k, _), gk in zip(theta0.items(), torch.autograd.grad(lam[j] * m, list(theta0.values()))):
            target[k] += gk / len(x)
    model.requires_grad_(False)
    at = {k: v.detach() for k, v in theta0.items()}
    assert kkt.stationarity_loss(model, target, x, y, lam, at=at, soft=soft).item() < 1e-10
    x2 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    assert kkt.stationarity_loss(model, target, x2, y, lam, at=at, soft=soft).item() > 1e-6
    assert kkt.stationarity_loss(model, target, x, y, 1.1 * lam, at=at, soft=soft).item() > 1e-6


def test_residual_is_one_when_nothing_is_explained():
    theta = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    assert kkt.residual(theta, zero).item() == pytest.approx(1.0)
    # (a): |(3,4) - (3,0)|^2 / 25 = 16/25; (b): 0 -> mean 8/25
    assert kkt.residual(theta, {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0])}).item() == pytest.approx(8 / 25)


def test_margins_hard_and_soft_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    assert kkt.margins(logits, torch.tensor([0])).item() == pytest.approx(1.0)
    assert kkt.margins(logits, torch.tensor([1])).item() == pytest.approx(-2.0)
    soft = 2.0 - torch.log(torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(1.0)))
    assert kkt.margins(logits, torch.tensor([0]), soft=True).item() == pytest.approx(soft.item())


def test_chunked_backward_equals_one_pass():
    model = _fc()
    theta = kkt.stationarity_parameters(model)
    x, y, lam = _data(m=7)
    grads = []
    for batch in (None, 3):
        xs, ls = x.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        value = kkt.residual_backward(model, theta, xs, y, ls, soft=True, batch=batch)
        grads.append((value, xs.grad, ls.grad))
    (v1, gx1, gl1), (v2, gx2, gl2) = grads
    assert v1.item() == pytest.approx(v2.item(), rel=1e-12)
    assert torch.allclose(gx1, gx2, rtol=1e-9, atol=1e-14) and torch.allclose(gl1, gl2, rtol=1e-9, atol=1e-14)
    assert gx1.abs().sum() > 0


def test_layer_selection():
    fc = _fc()
    assert set(kkt.stationarity_parameters(fc, "first")) == {"fc.0.weight", "fc.0.bias"}
    assert set(kkt.stationarity_parameters(fc, "fc")) == set(dict(fc.named_parameters()))
    torch.manual_seed(0)
    cnn = PaperCNN((1, 8, 8), 3, width=2, hidden=4)
    assert set(kkt.stationarity_parameters(cnn, "first")) == {"trunk.0.0.weight", "trunk.0.0.bias"}
    assert set(kkt.stationarity_parameters(cnn, "fc")) == {"fc.0.weight", "fc.0.bias", "out.weight", "out.bias"}
    # BatchNorm's bias starts at exactly 0: left out (cannot be normalised), its weight (ones) kept
    every = kkt.stationarity_parameters(cnn, "all")
    assert "trunk.0.1.weight" in every and "trunk.0.1.bias" not in every


# ---- (b) smoothed ReLU -------------------------------------------------------------------------------

def test_smooth_relu_derivative_by_hand():
    x = torch.tensor([0.0, 0.01, -0.02], requires_grad=True)
    kkt.SmoothReLU(alpha=100.0)(x).sum().backward()
    expected = torch.sigmoid(torch.tensor([0.0, 1.0, -2.0]))
    assert torch.allclose(x.grad, expected)
    x.grad = None
    kkt.SmoothReLU(alpha=100.0, slope=0.2)(x).sum().backward()
    assert torch.allclose(x.grad, 0.2 + 0.8 * expected)


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    out = model(x)
    g, = torch.autograd.grad(out.gather(1, y[:, None]).sum(), x)
    return out.detach(), g


def test_smoothing_changes_gradients_not_values_and_converges():
    model = _fc()
    x, y, _ = _data()
    x = x - 0.5
    out, g = _input_grad(model, x, y)
    with kkt.smooth_relu(model, alpha=1.0):
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        out1, g1 = _input_grad(model, x, y)
    with kkt.smooth_relu(model, alpha=1e7):
        out2, g2 = _input_grad(model, x, y)
    assert torch.equal(out, out1) and torch.equal(out, out2)
    assert (g - g1).abs().max() > 1e-2 * g.abs().max()
    assert torch.allclose(g, g2, rtol=1e-6, atol=1e-9)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2      # restored
    assert not any(isinstance(m, kkt.SmoothReLU) for m in model.modules())


def test_leaky_relu_values_unchanged_and_double_backward_works(tiny_cnn):
    x = torch.rand(2, 1, 12, 12)
    y = torch.tensor([0, 2])
    ref = tiny_cnn(x)
    with kkt.smooth_relu(tiny_cnn, alpha=100.0):
        assert torch.equal(tiny_cnn(x), ref)
        xs = x.clone().requires_grad_(True)
        theta = kkt.stationarity_parameters(tiny_cnn, "all")
        kkt.stationarity_loss(tiny_cnn, theta, xs, y, torch.ones(2)).backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    assert sum(isinstance(m, nn.LeakyReLU) for m in tiny_cnn.modules()) == 5


# ---- (c) settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, word", [(dict(lambda_min=-0.1), "lambda_min"), (dict(per_class=0), "per_class"),
                                      (dict(layers="conv"), "layers"), (dict(alpha=0.0), "alpha"),
                                      (dict(steps=0), "steps"), (dict(lr=float("nan")), "lr"),
                                      (dict(lambda_init=0.01), "lambda_init"), (dict(lambda_sign="neg"), "lambda_sign"),
                                      (dict(batch=0), "batch"), (dict(prior=-1.0), "prior"),
                                      (dict(weight_decay_form="yes"), "weight_decay_form"), (dict(device="tpu"), "device")])
def test_bad_settings_are_clear_errors(kw, word):
    with pytest.raises(ConfigError, match=word):
        KKTConfig(**kw)


def test_unknown_layer_error_names_the_choices():
    with pytest.raises(ConfigError, match="all.*first.*fc"):
        KKTConfig(layers="conv")


def test_flat_round_trip_and_unknown_keys():
    cfg = KKTConfig.from_flat({"steps": 5.0, "alpha": 10, "layers": "first"})
    assert (cfg.steps, cfg.alpha, cfg.layers) == (5, 10.0, "first") and isinstance(cfg.steps, int)
    assert KKTConfig.from_flat(cfg.flat()) == cfg
    assert KKTConfig.from_flat({"lr": 0.5}, base=cfg).steps == 5
    with pytest.raises(ConfigError, match="stepz"):
        KKTConfig.from_flat({"stepz": 3})
    assert "lambda_min" in KKTConfig.names() and "seed" not in KKTConfig.names()


# ---- (d) a tiny run ----------------------------------------------------------------------------------

def test_run_kkt_tiny_fc():
    model = _fc(torch.float32)
    lines = []
    cfg = KKTConfig(steps=20, log_every=5, lr=0.02)
    out = kkt.run_kkt(model, 3, (1, 4, 4), cfg, train_per_class=2, log=lines.append)
    assert out.kind == "kkt" and out.checkpoint_format == kkt.KKT_FORMAT
    assert out.images.shape == (12, 1, 4, 4) and out.images.min() >= 0 and out.images.max() <= 1
    assert torch.equal(out.labels, torch.arange(3).repeat_interleave(4))
    assert isinstance(out.module, kkt.KKTCandidates) and out.module.lam.min() >= cfg.lambda_min
    assert out.settings["per_class"] == 4 and out.steps == 20
    assert [r["step"] for r in out.history] == [1, 5, 10, 15, 20] and len(lines) == 5 and "steps/s" in lines[0]
    assert out.history[-1]["loss"] < out.history[0]["loss"]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    rebuilt = kkt.build_candidates(out.module.spec())
    rebuilt.load_state_dict(out.module.state_dict())
    assert torch.equal(rebuilt.x, out.module.x)


def test_callback_stops_and_nonfinite_raises(monkeypatch):
    model = _fc(torch.float32)
    seen = []
    out = kkt.run_kkt(model, 3, (1, 4, 4), KKTConfig(steps=50, per_class=1), train_per_class=1,
                      callback=lambda s, rec, cand: seen.append((s, rec["loss_residual"])) or True, log=None)
    assert out.steps == 1 and len(seen) == 1 and out.images.shape == (3, 1, 4, 4)
    monkeypatch.setattr(kkt, "range_prior", lambda x: x.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        kkt.run_kkt(model, 3, (1, 4, 4), KKTConfig(steps=3, per_class=1), train_per_class=1, log=None)
