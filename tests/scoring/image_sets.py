"""Tiny image sets for the exposure tests (tests/scoring/test_exposure*.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class S:  # duck-typed stand-in for tldr_core.attack.data.Split
    images: torch.Tensor
    labels: torch.Tensor


def textures(n: int, seed: int, side: int = 16) -> torch.Tensor:
    """(n, 1, side, side) random textures in [0, 1]. Two independent ones have SSIM < ~0.31
    (measured: max over 19,900 pairs), so any pair >= 0.4 in a test is a (near) copy."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, side, side, generator=g) + 0.05 * torch.randn(n, 1, side, side, generator=g)).clamp(0, 1)
