"""Training the conditioned generator against a frozen classifier. Never imports Ray:
the Tune script adapts this loop through its `callback`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tldr_core.attack.config import AttackConfig
from tldr_core.attack.losses import compute_terms, weighted_total
from tldr_core.attack.models import ConditionedGenerator, balanced_conditioning, sample_conditioning


class NonFiniteLossError(FloatingPointError):
    """The generator's loss became NaN/inf: the run is stopped rather than writing NaNs."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    generator: ConditionedGenerator
    history: list[dict[str, float]] = field(default_factory=list)  # one record per logged step
    seconds: float = 0.0
    steps: int = 0


# callback(step, record, generator) -> True to stop early (e.g. a scheduler decided so)
Callback = Callable[[int, dict[str, float], ConditionedGenerator], "bool | None"]


def _non_finite(terms: dict[str, torch.Tensor], step: int, lr: float, exact: bool) -> NonFiniteLossError:
    """The error for a non-finite loss, naming its likely cause (``exact``: found at this step, not by it)."""
    bad = {k: t.item() for k, t in terms.items()}
    if step == 1:  # no update yet: the learning rate played no part
        why = ("the loss weights are too large (every term is finite, their weighted sum is not)"
               if all(math.isfinite(v) for v in bad.values()) else
               "the classifier's outputs on the generator's images are not finite")
        return NonFiniteLossError(f"generator loss is non-finite at step 1, before any update (terms: {bad}): {why}")
    return NonFiniteLossError(f"generator loss became non-finite {'at' if exact else 'by'} step {step} (terms: {bad}); "
                              f"lower the learning rate (now {lr}) or the largest loss weights")


def train_generator(classifier: nn.Module, num_classes: int, image_shape: tuple[int, int, int], cfg: AttackConfig, *,
                    callback: Callback | None = None, log_every: int = 50,
                    log: Callable[[str], None] | None = print) -> TrainResult:
    """Train one generator for `cfg.steps` steps; records per-term losses (unweighted and weighted).

    The image priors of `cfg` (bn, jitter, flip) act only here, in training: `generate` draws
    plain images from the generator.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # z and the conditioning are drawn on the device itself: no host->device copy per step on CUDA
    # (on the CPU this is the same generator and the same stream as ever).
    rng = torch.Generator(device).manual_seed(cfg.seed)
    classifier = classifier.to(device).eval().requires_grad_(False)
    gen = ConditionedGenerator(cfg.variant, num_classes, image_shape, cfg.latent_dim, cfg.gen_dropout).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    # Decay the step size over the last half: late steps refine rather than jump between modes.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < cfg.steps // 2 else 0.5 * (1 + math.cos(math.pi * (s - cfg.steps // 2) / max(cfg.steps - cfg.steps // 2, 1))))
    weights = cfg.term_weights()  # the nine for this mode, plus the "bn" prior
    # Jitter/flip draw from their own generator: switched off, every other random stream is unchanged.
    aug_rng = torch.Generator().manual_seed(cfg.seed + 1) if cfg.jitter or cfg.flip else None
    result = TrainResult(generator=gen)
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        gen.train()
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=rng, device=device)
        v, labels = sample_conditioning(cfg.batch_size, num_classes, cfg.mode, rng, device)
        images = gen(z, v, labels)
        terms = compute_terms(classifier, images, v, labels, cfg, generator=aug_rng)
        total = weighted_total(terms, weights)
        log_now = step % log_every == 0 or step == cfg.steps or step == 1
        # Reading the loss on the host waits for the device; on CUDA only the logged steps pay that.
        if (log_now or device.type == "cpu") and not torch.isfinite(total):
            raise _non_finite(terms, step, cfg.lr, exact=device.type == "cpu")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 10.0)  # Grad's double backward can spike
        opt.step()
        sched.step()
        result.steps = step
        if log_now:
            record: dict[str, float] = {"step": step, "loss": total.item(), "seconds": time.time() - t0}
            for k, t in terms.items():
                record[f"loss_{k}"] = t.item()
                record[f"wloss_{k}"] = t.item() * weights[k]
            result.history.append(record)
            if log:
                rate = step / max(time.time() - t0, 1e-9)
                log(f"  step {step:5d}/{cfg.steps}  loss {record['loss']:.4f}  ce {record['loss_ce']:.3f}"
                    f"  ({rate:.1f} steps/s, ~{(cfg.steps - step) / rate:.0f}s left)")
            if callback and callback(step, record, gen):
                break
    result.seconds = time.time() - t0
    gen.eval()
    return result


@torch.no_grad()
def generate(gen: ConditionedGenerator, per_class: int, *, seed: int = 0, device: str | torch.device = "cpu",
             clamp: bool = True, dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Hot-conditioned reconstructions, `per_class` of each class in class order.

    dropout=True keeps the generator's dropout active while batch norm uses its running statistics:
    the paper draws diversity from heavy dropout during generation, and without it a generator that
    learned to ignore z returns near-copies of one image per class.
    Returns (images (R, C, H, W) float32, clamped to [0, 1] unless clamp=False; labels (R,) int64).
    """
    gen = gen.to(device).eval()
    if dropout:
        for m in gen.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.train()
    torch.manual_seed(seed)  # dropout masks come from the global generator
    v, labels = balanced_conditioning(per_class, gen.num_classes, device)
    z = torch.randn(len(labels), gen.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    images = gen(z, v, labels)
    gen.eval()
    if clamp:
        images = images.clamp(0, 1)
    return images.float().cpu(), labels.cpu()


def summarize_history(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged record's losses (for metrics.json)."""
    return {k: v for k, v in history[-1].items() if k.startswith(("loss", "wloss"))} if history else {}
