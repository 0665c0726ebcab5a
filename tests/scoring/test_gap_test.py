"""The memorisation gap's permutation test (tldr_core.scoring.gap_test): by hand on two columns, and on
sets whose answer is known (copies of T are significant; an image set that never saw T is not)."""
from __future__ import annotations

import pytest
import torch

from image_sets import S, textures  # noqa: E402 - tests/scoring/image_sets.py
from tldr_core.scoring.gap_test import gap_permutation_test
from tldr_core.scoring.ssim import ssim_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_image_each_side_by_hand():
    """One class, one training and one held-out image: a random split either keeps or swaps them, so the
    permuted gaps are +d and -d, each about half the time, and p = (1 + #(>= d)) / (1 + n) ~ 1/2."""
    t, h, r = textures(1, 1), textures(1, 2), textures(1, 3)
    r = 0.6 * t + 0.4 * r  # closer to the training image
    d = float(ssim_matrix(r, t)[0, 0] - ssim_matrix(r, h)[0, 0])
    gap, p = gap_permutation_test(r, torch.zeros(1), S(t, torch.zeros(1)), S(h, torch.zeros(1)), n_perm=2000, seed=1)
    assert d > 0 and gap == pytest.approx(d, abs=1e-6)
    assert 0.45 < p < 0.55  # (1 + ~1000) / 2001


def test_copies_of_training_images_are_significant_and_an_unrelated_set_is_not():
    y = torch.arange(4).repeat_interleave(10)
    train, heldout = S(textures(40, 10), y), S(textures(40, 11), y)
    copies = train.images[::2]  # 5 copies per class
    gap, p = gap_permutation_test(copies, y[::2], train, heldout, n_perm=500)
    assert gap > 0.5 and p == pytest.approx(1 / 501)  # no split beats the real one
    other = textures(20, 12)  # a set that never saw T
    gap, p = gap_permutation_test(other, y[::2], train, heldout, n_perm=500)
    assert abs(gap) < 0.05 and p > 0.05


def test_deterministic_and_validated():
    y = torch.arange(2).repeat_interleave(5)
    train, heldout = S(textures(10, 20), y), S(textures(10, 21), y)
    r = textures(4, 22)
    a = gap_permutation_test(r, torch.tensor([0, 0, 1, 1]), train, heldout, n_perm=100, seed=3)
    assert a == gap_permutation_test(r, torch.tensor([0, 0, 1, 1]), train, heldout, n_perm=100, seed=3)
    with pytest.raises(ValueError, match="n_perm"):
        gap_permutation_test(r, torch.tensor([0, 0, 1, 1]), train, heldout, n_perm=0)
    with pytest.raises(ValueError, match="no class"):
        gap_permutation_test(r, torch.tensor([5, 5, 5, 5]), train, heldout)
