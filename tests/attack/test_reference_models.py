"""Reference models for offline LiRA: trained on the population set only, cached, settings from a checkpoint."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.data import load_dataset
from tldr_core.attack.reference_models import (load_or_train_reference, reference_bundle, reference_cache_path,
                                               reference_indices, settings_from_meta)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits-8x8", 100, seed=0)  # T, H' 10 per class; P = the other 1,597 digits


def test_sizes_balance_and_seeding():
    t = torch.arange(4).repeat(5)  # |T| = 20, 5 per class of 4
    big = torch.arange(4).repeat_interleave(12)  # P = 48 >= 2 |T|: |T_c| = 5 per class
    idx = reference_indices(t, big, 0)
    assert idx.numel() == 20 and torch.bincount(big[idx]).tolist() == [5, 5, 5, 5]
    assert torch.equal(idx, reference_indices(t, big, 0)) and not torch.equal(idx, reference_indices(t, big, 1))
    assert idx.unique().numel() == 20 and int(idx.max()) < 48
    small = torch.arange(4).repeat_interleave(7)  # P = 28 < 40: half of each class, rounded down
    assert torch.bincount(small[reference_indices(t, small, 3)]).tolist() == [3, 3, 3, 3]
    # a class of P smaller than 2 |T_c| is capped at half even when P as a whole is large
    skew = torch.cat([torch.zeros(6), torch.ones(30), torch.full((30,), 2), torch.full((30,), 3)]).long()
    assert torch.bincount(skew[reference_indices(t, skew, 0)]).tolist() == [3, 5, 5, 5]
    with pytest.raises(ValueError, match="too small"):
        reference_indices(t, torch.tensor([0, 1, 2]), 0)


def _pool_index(images, lookup):
    return {lookup[img.numpy().tobytes()] for img in images}


def test_T_and_H_never_enter_a_reference_training_set(digits):
    from sklearn.datasets import load_digits

    pool = torch.from_numpy(load_digits().images.astype("float32").reshape(-1, 1, 8, 8) / 16.0)
    lookup = {img.numpy().tobytes(): i for i, img in enumerate(pool)}  # the 1,797 digits are distinct
    assert len(lookup) == len(pool)
    t_ids, h_ids = _pool_index(digits.train.images, lookup), _pool_index(digits.heldout.images, lookup)
    p_ids = _pool_index(digits.test.images, lookup)
    for k in range(3):
        ref = reference_bundle(digits, k)
        assert len(ref.train) == 100 and torch.bincount(ref.train.labels).tolist() == [10] * 10
        r_ids = _pool_index(ref.train.images, lookup)
        # by index into the original pool, and by pixel content against every image of T and H'
        assert len(r_ids) == 100 and r_ids <= p_ids and not r_ids & (t_ids | h_ids)
        flat = ref.train.images.flatten(1)
        for split in (digits.train, digits.heldout):
            same = (flat[:, None, :] == split.images.flatten(1)[None, :, :]).all(dim=2)
            assert not same.any()
        assert len(ref.test) == len(digits.test) - 100  # the rest of P
        idx = reference_indices(digits.train.labels, digits.test.labels, k)
        assert torch.equal(ref.train.images, digits.test.images[idx])


def test_a_reference_is_trained_once_then_reused(digits, tmp_path):
    st = ClassifierSettings(arch="mlp", epochs=2, hidden=16, seed=5)
    lines = []
    model, meta, path = load_or_train_reference(digits, st, 1, cache_dir=tmp_path, log=lines.append)
    assert path == reference_cache_path(digits, st, 1, tmp_path) and path.exists()
    assert meta["dataset"] == "digits-8x8-ref1" and meta["train_size"] == 100 and meta["settings"]["seed"] == 7  # seed + k + 1
    assert meta["test_size"] == len(digits.test) - 100
    mtime = path.stat().st_mtime_ns
    lines.clear()
    model2, _, path2 = load_or_train_reference(digits, st, 1, cache_dir=tmp_path, log=lines.append)
    assert path2 == path and path.stat().st_mtime_ns == mtime and any("reusing" in s for s in lines)
    x = digits.train.images[:5]
    assert torch.equal(model(x), model2(x))
    assert reference_cache_path(digits, st, 2, tmp_path) != path


def test_settings_from_meta():
    recorded = {"settings": {"arch": "mlp", "epochs": 7, "batch_size": 32, "lr": 0.01, "optimizer": "sgd",
                             "weight_decay": 0.001, "dropout": 0.1, "hidden": 64, "seed": 3, "depth": 2}}
    st, unknown = settings_from_meta(recorded)
    assert unknown == [] and st == ClassifierSettings(**recorded["settings"])
    # a checkpoint without training settings: the architecture from its spec, the rest unknown
    spec = {"arch": "cnn", "in_shape": [1, 8, 8], "num_classes": 10, "dropout": 0.3, "width": 32, "hidden": 96}
    st, unknown = settings_from_meta({}, spec)
    assert (st.arch, st.dropout, st.hidden) == ("cnn", 0.3, 96)
    assert unknown == ["epochs", "batch_size", "lr", "optimizer", "weight_decay", "seed"]
    st, unknown = settings_from_meta({}, spec, overrides={"epochs": "4", "lr": 0.002})
    assert (st.epochs, st.lr) == (4, 0.002) and unknown == ["batch_size", "optimizer", "weight_decay", "seed"]
    st, unknown = settings_from_meta({}, {"arch": "fc", "widths": [50, 50, 50]})
    assert (st.arch, st.hidden, st.depth) == ("fc", 50, 3) and "dropout" not in unknown and "depth" not in unknown
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        settings_from_meta({}, {"arch": "fc", "widths": [50, 20]})
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        settings_from_meta({}, {**spec, "width": 8})
    with pytest.raises(ValueError, match="epochs='many' is not a int"):
        settings_from_meta({"settings": {"epochs": "many"}})
    with pytest.raises(ValueError, match="epochs=2.5 is not a int"):
        settings_from_meta({"settings": {"epochs": 2.5}})
    assert settings_from_meta({"settings": {"epochs": 3.0}})[0].epochs == 3
    full = ClassifierSettings(arch="fc", hidden=20, depth=3, weight_decay=0.01, seed=9)  # what tldr records
    assert settings_from_meta({"settings": asdict(full)}) == (full, [])
    with pytest.raises(ValueError, match="optimizer"):
        settings_from_meta({"settings": {"optimizer": "lbfgs"}})
