"""Image sets in one .npz file (--dataset npz / cifar10 from an .npz): layouts, splits, and refusals."""
import numpy as np
import pytest
import torch

from tldr_core.attack.data import DataError, DatasetNotFoundError, load_dataset


def _cifar_like(n_per_class: int, n_test_per_class: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 (N, 32, 32, 3) images + int labels, the layout of the CIFAR-10 dev file and Keras' cifar10."""
    rng = np.random.default_rng(seed)
    d = {}
    for split, k in (("train", n_per_class), ("test", n_test_per_class)):
        if k:
            y = np.repeat(np.arange(10), k)
            d[f"x_{split}"] = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
            d[f"y_{split}"] = y.astype(np.int64)
    return d


def _save(tmp_path, **arrays) -> str:
    p = tmp_path / "set.npz"
    np.savez(p, **arrays)
    return str(p)


def test_cifar_layout_official_split_and_exact_pixels(tmp_path):
    d = _cifar_like(6, 3)
    b = load_dataset("npz", 30, data_root=_save(tmp_path, **d))
    assert b.image_shape == (3, 32, 32) and b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert (len(b.train), len(b.heldout), len(b.test)) == (30, 30, 30)
    assert np.bincount(b.train.labels.numpy()).tolist() == [3] * 10
    # every training image is one of x_train's rows, moved to CHW and scaled by 1/255 exactly
    flat = torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2).float().div(255.0).flatten(1)
    hits = (b.train.images.flatten(1)[:, None, :] == flat[None]).all(-1)
    assert hits.sum(1).tolist() == [1] * 30
    rows = hits.float().argmax(1)
    assert (torch.from_numpy(d["y_train"])[rows] == b.train.labels).all()
    # T and H' are disjoint rows of x_train; the test set comes from x_test
    rows_h = (b.heldout.images.flatten(1)[:, None, :] == flat[None]).all(-1).float().argmax(1)
    assert not set(rows.tolist()) & set(rows_h.tolist())
    test_flat = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).float().div(255.0).flatten(1)
    assert (b.test.images.flatten(1)[:, None, :] == test_flat[None]).all(-1).any(1).all()


def test_cifar10_from_npz_keeps_cifar_names_and_npz_names_come_from_the_file(tmp_path):
    path = _save(tmp_path, **_cifar_like(4, 2))
    assert load_dataset("cifar10", 20, data_root=path).class_names[:2] == ["airplane", "automobile"]
    names = np.array([f"c{i}" for i in range(10)])
    path2 = tmp_path / "named.npz"
    np.savez(path2, **_cifar_like(4, 2), class_names=names)
    assert load_dataset("npz", 20, data_root=path2).class_names == names.tolist()


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "keras_labels", "float"])
def test_other_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 8)
    if layout == "NHW":
        x, shape = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), (1, 8, 8)
    elif layout == "float":
        x, shape = rng.random((24, 8, 8, 3)).astype(np.float32), (3, 8, 8)
    else:
        x, shape = rng.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8), (3, 8, 8)
    labels = y[:, None] if layout == "keras_labels" else y
    b = load_dataset("npz", 9, data_root=_save(tmp_path, x_train=x, y_train=labels))  # one pool: no x_test
    assert b.image_shape == shape and b.num_classes == 3 and len(b.train) == 9 and len(b.test) >= 3
    assert 0.0 <= float(b.train.images.min()) and float(b.train.images.max()) <= 1.0
    if layout == "float":  # already in [0, 1]: not divided by 255 again
        assert float(b.train.images.max()) > 0.5


def test_pickled_object_arrays_are_refused_not_unpickled(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match="object arrays are refused"):
        load_dataset("npz", 10, data_root=p)


@pytest.mark.parametrize("arrays, needle", [
    ({"x_train": np.zeros((20, 8, 8), np.uint8)}, "no y_train"),
    ({"x_train": np.zeros((20, 8, 8), np.int32), "y_train": np.arange(20) % 2}, "dtype int32"),
    ({"x_train": np.full((20, 8, 8), 2.0, np.float32), "y_train": np.arange(20) % 2}, r"in \[0, 1\]"),
    ({"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(19) % 2}, "20 integer labels"),
    ({"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 2 - 1}, "outside"),
    ({"x_train": np.zeros((20, 8, 8, 5), np.uint8), "y_train": np.arange(20) % 2}, "C = 1 or 3"),
    ({"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 2,
      "x_test": np.zeros((4, 8, 8), np.uint8)}, "come together"),
    ({"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 2,
      "x_test": np.zeros((4, 9, 9), np.uint8), "y_test": np.arange(4) % 2}, "differ in image shape"),
])
def test_malformed_files_are_one_clear_error(tmp_path, arrays, needle):
    with pytest.raises(DataError, match=needle):
        load_dataset("npz", 4, data_root=_save(tmp_path, **arrays))


def test_missing_or_non_npz_file(tmp_path):
    with pytest.raises(DataError, match="--data-root FILE.npz"):
        load_dataset("npz", 10)
    with pytest.raises(DatasetNotFoundError, match="is not a file"):
        load_dataset("npz", 10, data_root=tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset("npz", 10, data_root=junk)


# ---- issue 24: bounds from the headers, labels, classes, NaN

def test_the_decompressed_size_is_checked_from_the_headers_before_reading(tmp_path, monkeypatch):
    import tldr_core.attack.npz_data as nd

    path = _save(tmp_path, x_train=np.zeros((40, 8, 8), np.uint8), y_train=np.arange(40) % 2)
    monkeypatch.setattr(nd, "MAX_NPZ_BYTES", 40 * 64 + 40 * 8 - 1)  # one byte short of x_train + y_train
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda *a: pytest.fail("no array may be read"))
    with pytest.raises(DataError, match="once decompressed .*refused before reading"):
        load_dataset("npz", 10, data_root=path)


@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 1] * 19 + [10 ** 9, 1]), "label 1,000,000,000, outside 0..99,999"),
    (np.array([0, 1] * 19 + [2 ** 63 + 5, 1], np.uint64), "label 9,223,372,036,854,775,813, outside"),
    (np.zeros(40, np.int64), "name 1 class"),
    (np.arange(40) % 2 * 3, r"2 of 4 classes have no image in y_train \(1, 2\)"),
])
def test_labels_are_bounded_before_class_names_are_made(tmp_path, labels, needle):
    with pytest.raises(DataError, match=needle):
        load_dataset("npz", 10, data_root=_save(tmp_path, x_train=np.zeros((40, 8, 8), np.uint8), y_train=labels))


def test_nan_pixels_are_named_as_nan(tmp_path):
    x = np.full((40, 8, 8), 0.5, np.float32)
    x[3, 2, 1] = np.nan
    with pytest.raises(DataError, match="holds NaN or infinite values"):
        load_dataset("npz", 10, data_root=_save(tmp_path, x_train=x, y_train=np.arange(40) % 2))
