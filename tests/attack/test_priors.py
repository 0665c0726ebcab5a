"""Image priors for TLDR: BatchNorm-statistics matching through a real classifier, jitter/flips of
the classifier's input only, and priors off = the training loop exactly as before them."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tldr_core.attack import losses, train
from tldr_core.attack.config import AttackConfig, ConfigError
from tldr_core.attack.models import FC, PaperCNN

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
# The last commit whose train.py / losses.py predate the priors: the reference for "priors off".
BEFORE_PRIORS = "b7e9bb1861bdbe7d0d4cd796e0aa26f02d4b1cd6"


def _cfg(**kw) -> AttackConfig:
    return AttackConfig.from_flat(kw)


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g)
    return x, torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float(), torch.arange(n) % 3


def test_bn_term_vanishes_when_running_statistics_are_the_batch_statistics(tiny_cnn):
    """Set each BatchNorm layer's running statistics, in order, to its input's batch statistics
    (later layers' inputs depend on earlier layers' statistics, hence one forward per layer)."""
    x, _, _ = _batch()
    bns = [m for m in tiny_cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4
    with losses.record_bn_inputs(tiny_cnn) as seen:
        tiny_cnn(x)
    assert losses.bn_term(seen).item() > 1e-3
    for i, bn in enumerate(bns):
        with losses.record_bn_inputs(tiny_cnn) as seen:
            tiny_cnn(x)
        a = seen[i][1].transpose(0, 1).flatten(1)
        bn.running_mean.copy_(a.mean(1))
        bn.running_var.copy_(a.var(1, unbiased=False))
    terms = losses.compute_terms(tiny_cnn, x, *_batch()[1:], _cfg(bn=1.0, grad=0.0, kl_pert=0, ce_pert=0))
    assert terms["bn"].item() < 1e-5
    x2 = x.clone()
    x2[:, :, :4] = 1.0
    assert losses.compute_terms(tiny_cnn, x2, *_batch()[1:], AttackConfig(bn=1.0))["bn"].item() > 1e-3


def test_bn_term_is_weighted_in_the_total_and_reaches_the_images(tiny_cnn):
    x, v, y = _batch()
    cfg = AttackConfig(bn=0.3)
    x = x.requires_grad_(True)
    terms = losses.compute_terms(tiny_cnn, x, v, y, cfg)
    with losses.record_bn_inputs(tiny_cnn) as seen:
        tiny_cnn(x)
    assert torch.allclose(terms["bn"], losses.bn_term(seen))
    total = losses.weighted_total(terms, cfg.term_weights())
    without = losses.weighted_total({k: t for k, t in terms.items() if k != "bn"}, cfg.effective_weights)
    assert total.item() == pytest.approx(without.item() + 0.3 * terms["bn"].item(), rel=1e-6)
    g, = torch.autograd.grad(terms["bn"], x)
    assert g.abs().sum() > 0
    assert "bn" not in losses.compute_terms(tiny_cnn, x, v, y, AttackConfig())


def test_bn_prior_on_a_model_without_batch_norm_is_a_clear_error():
    model = FC((1, 12, 12), 3, widths=(5,)).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match="BatchNorm"):
        losses.compute_terms(model, *_batch(), AttackConfig(bn=1.0))


def test_augment_by_hand():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    assert losses.augment(x) is x
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    assert torch.equal(losses.augment(x, jitter=2, generator=g), torch.roll(x, (dy, dx), (2, 3)))
    flips = {torch.equal(losses.augment(x, flip=True, generator=g), x.flip(3)) for _ in range(20)}
    assert flips == {True, False}
    assert torch.equal(x, torch.arange(24, dtype=torch.float32).reshape(2, 1, 3, 4))  # never in place


def test_jitter_and_flip_change_the_classifier_input_not_the_images(tiny_cnn):
    x, v, y = _batch()
    before = x.clone()
    seen = []
    hook = tiny_cnn.trunk.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    try:
        cfg = _cfg(jitter=3, flip=True, kl_pert=0, ce_pert=0, grad=0)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            terms = losses.compute_terms(tiny_cnn, x, v, y, cfg, generator=g)
        losses.compute_terms(tiny_cnn, x, v, y, _cfg(kl_pert=0, ce_pert=0, grad=0))
    finally:
        hook.remove()
    assert torch.equal(x, before)
    assert any(not torch.equal(s, x) for s in seen[:4]) and torch.equal(seen[4], x)
    assert terms["var"].item() == pytest.approx(losses.var(x).item())  # Var/Pix see the generated images


def _tiny_cfg(**kw):
    return AttackConfig(steps=3, batch_size=4, latent_dim=8, device="cpu", seed=3, **kw)


def _run(fn, cfg):
    torch.manual_seed(0)
    clf = PaperCNN((1, 12, 12), 3, width=4, hidden=8).eval().requires_grad_(False)
    res = fn(clf, 3, (1, 12, 12), cfg, log_every=1, log=None)
    hist = [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]
    return hist, res.generator.state_dict()


def _old_train_generator(tmp_path, monkeypatch):
    """train_generator as it was before the priors, loaded from git into tmp_path with its losses.py."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git history of the repository")
    src = {}
    for name in ("losses", "train"):
        proc = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_PRIORS}:tldr_core/attack/{name}.py"],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"commit {BEFORE_PRIORS[:7]} not in this clone")
        src[name] = proc.stdout
    src["train"] = src["train"].replace("from tldr_core.attack.losses import", "from tldr_old_losses import")
    mods = {}
    for name in ("losses", "train"):
        path = tmp_path / f"tldr_old_{name}.py"
        path.write_text(src[name])
        spec = importlib.util.spec_from_file_location(f"tldr_old_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, f"tldr_old_{name}", mods[name])
        spec.loader.exec_module(mods[name])
    return mods["train"].train_generator


def test_priors_off_is_bit_identical_to_the_loop_before_them(tmp_path, monkeypatch):
    old = _old_train_generator(tmp_path, monkeypatch)
    h_old, s_old = _run(old, _tiny_cfg())
    h_new, s_new = _run(train.train_generator, _tiny_cfg())
    assert h_new == h_old and len(h_new) == 3
    assert all(torch.equal(s_new[k], s_old[k]) for k in s_old)
    h_bn, _ = _run(train.train_generator, _tiny_cfg(bn=0.5, jitter=1, flip=True))
    assert "loss_bn" in h_bn[0] and h_bn[0]["wloss_bn"] == pytest.approx(0.5 * h_bn[0]["loss_bn"])
    assert h_bn[-1]["loss_ce"] != h_new[-1]["loss_ce"]
