"""The control zoo: canary images, how they are planted, and which data each control trains on."""
from __future__ import annotations

import pytest
import torch

from tldr_core.attack.data import DatasetBundle, Split
from tldr_core.attack.zoo import CONTROLS, canary_image, control_bundles, plant_canaries


def _bundle(n_per_class=6, k=2, side=10):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    split = lambda: Split(torch.rand(len(labels), 1, side, side, generator=g) * 0.3, labels.clone())  # noqa: E731
    return DatasetBundle(name="t", train=split(), heldout=split(), test=split(), num_classes=k,
                         class_names=[str(i) for i in range(k)], image_shape=(1, side, side), source="test")


def test_canary_is_inverted_with_a_stamped_square():
    img = torch.zeros(1, 10, 10)
    img[0, 5, 5] = 1.0
    c = canary_image(img)
    # inverted: 1 - x; the 2x2 square (side // 5) at (1..2, 1..2) was bright after inversion, so it is stamped dark
    assert c[0, 5, 5] == 0.0 and c[0, 9, 9] == 1.0
    assert torch.equal(c[0, 1:3, 1:3], torch.zeros(2, 2)) and c[0, 0, 0] == 1.0 and c[0, 3, 3] == 1.0


def test_plant_canaries_keeps_size_and_classes_and_scores_each_canary_once():
    b = _bundle()
    trained, scored, idx = plant_canaries(b.train, canaries=2, copies=3)
    assert len(trained) == len(b.train) and torch.equal(trained.labels, b.train.labels)
    # canary 0 (class 0) replaces the last 2 other class-0 images; canary 1 (class 0 too: images 0, 1 are class 0)
    for i in idx.tolist():
        copies = [j for j in range(len(trained)) if torch.equal(trained.images[j], trained.images[i])]
        assert len(copies) == 3 and torch.equal(trained.images[i], canary_image(b.train.images[i]))
    assert len(scored) == len(b.train) - 2 * 2 and idx.tolist() == [0, 1]
    assert torch.equal(scored.images[:2], trained.images[:2])
    with pytest.raises(ValueError, match="too few"):
        plant_canaries(b.train, canaries=1, copies=7)
    with pytest.raises(ValueError):
        plant_canaries(b.train, canaries=0, copies=2)


def test_control_bundles_swap_and_plain():
    b = _bundle()
    trained, scored, idx = control_bundles(CONTROLS["never-saw-t"], b)
    assert trained.train is b.heldout and scored is b and idx.numel() == 0  # trained on H', scored on T
    trained, scored, idx = control_bundles(CONTROLS["clean"], b)
    assert trained is b and scored is b
    assert {c.name for c in CONTROLS.values() if c.leaky} == {"leaky-fc", "stationary-fc", "margin-fc", "leaky-cnn",
                                                             "canaries"}
