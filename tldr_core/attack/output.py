"""What every attack returns, so scoring, artifacts and reports treat all attack families alike."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class AttackOutput:
    """One attack's reconstructions and what is needed to reproduce and record them.

    kind: the attack family ("tldr", "kkt", "templates").
    images: (R, C, H, W) float32 on the CPU, in [0, 1] (clamped for scoring).
    labels: (R,) int64, the class each reconstruction was made for.
    module: the trained object worth a weights-only checkpoint (the generator; the KKT candidates),
        with `checkpoint_format` naming its format in `attack.checkpoints`; None for attacks that train nothing.
    settings: the flat settings that produced it (recorded next to every result).
    history: per-logged-step loss dicts; steps and seconds: the optimisation's length and wall time.
    """

    kind: str
    images: torch.Tensor
    labels: torch.Tensor
    module: nn.Module | None = None
    checkpoint_format: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.kind}: images must be (R, C, H, W) and labels (R,), got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    @property
    def steps_per_second(self) -> float:
        return self.steps / max(self.seconds, 1e-9)
