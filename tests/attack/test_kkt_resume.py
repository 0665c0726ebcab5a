"""KKT extraction to convergence: a run resumed from its kkt.pt equals one uninterrupted run (bitwise),
the residual-plateau stop, the cosine schedule, and the functional / compiled step against the eager one."""
import math
from dataclasses import replace

import pytest
import torch

from tldr_core.attack import kkt
from tldr_core.attack.checkpoints import CheckpointError, save_checkpoint
from tldr_core.attack.config import ConfigError
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.kkt_resume import load_resume
from tldr_core.attack.models import FC, MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def _fc() -> FC:
    torch.manual_seed(0)
    return FC((1, 4, 4), 3, widths=(6, 5)).eval().requires_grad_(False)


def _run(cfg: KKTConfig, resume=None):
    return kkt.run_kkt(_fc(), 3, (1, 4, 4), cfg, train_per_class=1, log=None, resume=resume)


def _save(tmp_path, out, name="kkt.pt"):
    """As the audit writes kkt.pt (report.artifacts): the candidates, meta["attack"] = the settings."""
    return save_checkpoint(tmp_path / name, out.module, out.checkpoint_format, {"attack": out.settings, "dataset": "t"})


@pytest.mark.parametrize("changes", [{}, {"batch": 4, "plateau_window": 4, "plateau_tol": 1e-9}])
def test_two_resumed_halves_equal_one_run_bitwise(tmp_path, changes):
    cfg = KKTConfig(steps=14, per_class=3, lr=0.05, log_every=5, **changes)
    whole = _run(cfg)
    first = _run(replace(cfg, steps=7))
    second = _run(cfg, resume=load_resume(_save(tmp_path, first)))
    assert second.steps == whole.steps == 14 and second.extra["resumed_from"] == 7
    for name in ("x", "lam", "adam_x_avg", "adam_x_sq", "adam_lam_avg", "adam_lam_sq", "step", "plateau_ref"):
        assert torch.equal(getattr(second.module, name), getattr(whole.module, name)), name
    assert second.history[-1]["loss"] == whole.history[-1]["loss"] and second.history[0]["step"] == 8
    assert whole.history[-1]["stop"] == "steps" and whole.extra["stop_reason"] == "steps"


def test_resume_refuses_another_problem_or_no_more_steps(tmp_path):
    cfg = KKTConfig(steps=4, per_class=2, lr=0.05)
    state = load_resume(_save(tmp_path, _run(cfg)))
    with pytest.raises(ConfigError, match="alpha 100.0 -> 50.0"):
        _run(replace(cfg, steps=8, alpha=50.0), resume=state)
    with pytest.raises(ConfigError, match="already made 4 steps"):
        _run(cfg, resume=state)
    with pytest.raises(ConfigError, match="needs 9"):
        _run(replace(cfg, steps=8, per_class=3), resume=state)
    assert _run(replace(cfg, steps=6, lr=0.01), resume=state).steps == 6  # the learning rate may change


def test_resume_refuses_files_without_optimiser_state(tmp_path):
    old = kkt.KKTCandidates(6, (1, 4, 4), 3)  # as written before resumable runs: x, lam, labels only
    assert old.spec() == {"count": 6, "image_shape": [1, 4, 4], "num_classes": 3}
    path = save_checkpoint(tmp_path / "old.pt", old, kkt.KKT_FORMAT, {"attack": KKTConfig().flat()})
    with pytest.raises(CheckpointError, match="without their optimiser state"):
        load_resume(path)
    fresh = _run(KKTConfig(steps=2, per_class=2))
    no_meta = save_checkpoint(tmp_path / "nometa.pt", fresh.module, kkt.KKT_FORMAT, {})
    with pytest.raises(CheckpointError, match="does not record the settings"):
        load_resume(no_meta)


def test_plateau_check_by_hand():
    cfg = KKTConfig(plateau_window=10, plateau_tol=0.1)
    r = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert kkt.plateaued(cfg, 7, r(0.5), None) == (False, None)          # not a check step
    assert kkt.plateaued(cfg, 10, r(0.5), None) == (False, 0.5)          # first check: the reference
    assert kkt.plateaued(cfg, 20, r(0.44), 0.5) == (False, 0.44)         # 12 % better: go on
    assert kkt.plateaued(cfg, 30, r(0.40), 0.44) == (True, 0.40)         # 9.1 % < 10 %: stop
    assert kkt.plateaued(replace(cfg, plateau_window=0), 30, r(0.4), 0.44) == (False, 0.44)


def test_plateau_stop_ends_the_run_and_says_why():
    # tol 1: any improvement smaller than the whole residual counts as a plateau: stop at the second check
    out = _run(KKTConfig(steps=50, per_class=2, lr=0.05, log_every=100, plateau_window=5, plateau_tol=1.0))
    assert out.steps == 10 and out.extra["stop_reason"] == "plateau"
    assert out.history[-1]["stop"] == "plateau" and out.history[-1]["step"] == 10 and int(out.module.step) == 10
    assert math.isclose(float(out.module.plateau_ref), out.history[-1]["loss_residual"], rel_tol=1e-6)


def test_cosine_schedule():
    cfg = KKTConfig(steps=5, lr=0.1, lr_schedule="cosine", lr_floor=0.1)
    assert kkt.learning_rate(cfg, 1) == pytest.approx(0.1)
    assert kkt.learning_rate(cfg, 3) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))   # cos(π/2) = 0
    assert kkt.learning_rate(cfg, 5) == pytest.approx(0.01)
    assert kkt.learning_rate(replace(cfg, lr_schedule="constant"), 5) == 0.1
    out = _run(replace(cfg, per_class=2, log_every=2))  # logs steps 1, 2, 4, 5
    c = math.cos(math.pi / 4)
    expected = [0.1, 0.1 * (0.1 + 0.45 * (1 + c)), 0.1 * (0.1 + 0.45 * (1 - c)), 0.01]
    assert [h["lr"] for h in out.history] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="lr_schedule"):
        KKTConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="lr_floor"):
        KKTConfig(lr_floor=0.0)


@pytest.mark.parametrize("model_kind, batch", [("fc", None), ("fc", 2), ("leaky", None), ("leaky", 4)])
def test_functional_step_equals_the_eager_one(model_kind, batch):
    """torch.func's nested grad with the straight-through smoothed ReLU (what compile=True compiles) gives
    the eager double backward's residual and gradients, to 1e-6 relative (float32)."""
    torch.manual_seed(0)
    model = _fc() if model_kind == "fc" else MLP((1, 4, 4), 3, hidden=7).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x = (0.3 * torch.randn(6, 1, 4, 4, generator=g)).requires_grad_(True)
    lam = (torch.rand(6, generator=g) + 0.5).requires_grad_(True)
    y = torch.arange(6) % 3
    theta = kkt.stationarity_parameters(model)
    with kkt.smooth_relu(model, 20.0):
        res = kkt.residual_backward(model, theta, x, y, lam, soft=True, batch=batch)
    with kkt.smooth_relu(model, 20.0, functional=True):
        fres, gx, gl = kkt.functional_step(model, theta, y, soft=True, batch=batch)(x, lam)
    assert torch.allclose(fres, res, rtol=1e-6)
    assert torch.allclose(gx, x.grad, rtol=1e-5, atol=1e-6 * x.grad.abs().max().item())
    assert torch.allclose(gl, lam.grad, rtol=1e-5, atol=1e-6 * lam.grad.abs().max().item())


@pytest.mark.slow
def test_compiled_run_matches_the_eager_run():
    """compile=True (torch.compile of the torch.func step, CPU inductor): the same candidates after 10
    steps to 1e-5 (absolute, pixels of order 0.1-1), the same residual to 1e-5 relative."""
    cfg = KKTConfig(steps=10, per_class=2, lr=0.05, log_every=5)
    eager, compiled = _run(cfg), _run(replace(cfg, compile=True))
    assert torch.allclose(compiled.module.x, eager.module.x, atol=1e-5)
    assert torch.allclose(compiled.module.lam, eager.module.lam, atol=1e-5)
    assert compiled.history[-1]["loss_residual"] == pytest.approx(eager.history[-1]["loss_residual"], rel=1e-5)
