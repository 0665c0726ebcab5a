"""The TLDR attack as one call: train a conditioned generator against a frozen classifier, then draw
its hot-conditioned reconstructions (the same sampler the audit, the search trial, the bench and the
model registry use: `train.generate`, generation-time dropout on).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from tldr_core.attack.checkpoints import GENERATOR_FORMAT
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.train import Callback, generate, resolve_device, train_generator

KIND = "tldr"


def run_tldr(classifier: nn.Module, num_classes: int, image_shape: tuple[int, int, int], cfg: AttackConfig, *,
             callback: Callback | None = None, log: Callable[[str], None] | None = print,
             log_every: int = 100) -> AttackOutput:
    """Train a generator for ``cfg.steps`` steps and draw ``cfg.per_class`` reconstructions per class.

    The images are sampled with seed ``cfg.seed + 1`` on ``cfg.device`` (the training seed is
    ``cfg.seed``), so the same config gives the same images. ``callback(step, record, generator)``
    is called at each logged step (every ``log_every``) and may return True to stop early.

    Returns AttackOutput(kind="tldr"): images (R, C, H, W) float32 on the CPU in [0, 1], labels (R,)
    int64 in class order, module = the trained generator (eval mode, on ``cfg.device``),
    checkpoint_format = GENERATOR_FORMAT, settings = cfg.flat(), the per-logged-step loss history,
    steps run and training seconds.
    """
    result = train_generator(classifier, num_classes, image_shape, cfg, callback=callback, log=log,
                             log_every=log_every)
    images, labels = generate(result.generator, cfg.per_class, seed=cfg.seed + 1, device=resolve_device(cfg.device))
    return AttackOutput(kind=KIND, images=images, labels=labels, module=result.generator,
                        checkpoint_format=GENERATOR_FORMAT, settings=cfg.flat(), history=result.history,
                        steps=result.steps, seconds=result.seconds)
