"""Model-free references: images that need no model at all, scored and judged like an attack.

A verdict means something only if what needs no model cannot reach it (docs/method.md §9):

- **class mean of T**: each class's mean training image. It is a statistic of T, so on a small T it
  is itself closer to T than to H' (a memorisation gap with no model involved); the rule must rate
  it at most MEDIUM: it recovers no individual image.
- **class mean of P**: each class's mean population image (P, disjoint from T and H'). It knows
  nothing of T; the rule must rate it LOW on every model.

Each is scored by the audit's own pipeline (:func:`tldr_core.scoring.pipeline.score_attack`), so the
numbers are comparable with an attack's line for line.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tldr_core.attack.output import AttackOutput
from tldr_core.scoring.pipeline import Scored, population, score_attack
from tldr_core.scoring.risk import LEVELS

#: name -> (what it is, the highest level the rule may give it)
REFERENCES: dict[str, tuple[str, str]] = {
    "class-mean of T": ("each class's mean training image (a statistic of T; no model)", "MEDIUM"),
    "class-mean of P": ("each class's mean population image (knows nothing of T; no model)", "LOW"),
}


def class_means(split: Any, num_classes: int) -> tuple[Tensor, Tensor]:
    """((K, C, H, W) mean image of each class present in ``split``, (K,) their labels), classes ascending."""
    images, labels = split.images.detach().cpu().float(), split.labels.detach().cpu()
    present = [c for c in range(num_classes) if bool((labels == c).any())]
    means = torch.stack([images[labels == c].mean(dim=0) for c in present])
    return means, torch.tensor(present, dtype=torch.int64)


def reference_images(bundle: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (images, labels) of every model-free reference of :data:`REFERENCES`."""
    return {"class-mean of T": class_means(bundle.train, bundle.num_classes),
            "class-mean of P": class_means(population(bundle), bundle.num_classes)}


def score_references(classifier: nn.Module | None, bundle: Any, *, tau: float = 0.5, seed: int = 0,
                     index: Any = None) -> dict[str, Scored]:
    """Every reference scored like an attack's reconstructions (metrics, exposure, gallery)."""
    return {name: score_attack(AttackOutput(name, images, labels), classifier, bundle, tau=tau, seed=seed, index=index)
            for name, (images, labels) in reference_images(bundle).items()}


def within_bound(name: str, level: str) -> bool:
    """Whether ``level`` is at most the level :data:`REFERENCES` allows the reference ``name``."""
    return LEVELS.index(level) <= LEVELS.index(REFERENCES[name][1])
