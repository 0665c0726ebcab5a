"""Image sets stored as one NumPy `.npz` file: `--dataset npz --data-root FILE.npz`.

The file holds `x_train` and `y_train`, and optionally `x_test` / `y_test` and `class_names`:

- images: uint8 in [0, 255] (or float in [0, 1]), shaped (N, H, W) for grey, (N, H, W, C) as Keras and
  most exports write them, or (N, C, H, W) as PyTorch does, with C = 1 or 3;
- labels: integers 0..K-1, one per image, every class with at least one training image, K >= 2;
- class_names: K strings (else the classes are named "0".."K-1").

With a test split the file is split like the official torchvision sets (T and H' from x_train, the
test set from x_test); without one, like an image folder (all three from x_train). The file is read
with `allow_pickle=False`: an `.npz` carrying pickled objects is refused, never unpickled. Every
array's shape and type are read from its `.npy` header first: what the arrays would take once
decompressed (at most :data:`MAX_NPZ_BYTES`), the image count and the image size are checked before
any array is read, so a small file cannot ask for gigabytes.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tldr_core.attack.bounds import MAX_SIDE
from tldr_core.attack.model_specs import LIMITS

MAX_NPZ_IMAGES = 2_000_000  # a bound on what one file may ask us to hold (CIFAR-10 has 60,000)
MAX_NPZ_SIDE = MAX_SIDE
#: The arrays read, decompressed, in all (CIFAR-10 as uint8: 184 MB). Only the rows an audit uses are
#: converted to float32, at most 4 GiB from a uint8 file at this bound (the image folder's limit).
MAX_NPZ_BYTES = 1 << 30
MAX_CLASSES = LIMITS["num_classes"]  # what a classifier checkpoint may have
KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


class NpzFormatError(ValueError):
    """The file is not an image set in the layout described in this module's docstring."""


@dataclass
class NpzArrays:
    x_train: np.ndarray  # uint8 or float, (N, H, W) / (N, H, W, C) / (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    layout: str  # "NHW", "NHWC" or "NCHW"
    class_names: list[str]  # the file's, else the default names given to read_npz, else "0".."K-1"


def _layout(shape: tuple[int, ...], path: Path, key: str) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    if len(shape) == 4 and shape[-1] in (1, 3):
        return "NHWC"
    raise NpzFormatError(f"{path}: {key} has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                         "with C = 1 or 3")


def _header(f: np.lib.npyio.NpzFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member ``key`` from its .npy header; nothing else of it is read."""
    member = f"{key}.npy" if f"{key}.npy" in f.zip.namelist() else key
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with f.zip.open(member) as fp:
            version = np.lib.format.read_magic(fp)
            if version not in readers:
                raise ValueError(f".npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
            shape, _, dtype = readers[version](fp)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise NpzFormatError(f"{path}: {key} is not a NumPy array ({' '.join(str(e).split())[:120]})") from None
    if dtype.hasobject:
        raise NpzFormatError(f"{path}: {key} holds Python objects (object arrays are refused; store numbers and strings)")
    return tuple(shape), dtype


def _check_headers(headers: dict[str, tuple[tuple[int, ...], np.dtype]], path: Path) -> str:
    """Sizes from the headers, before reading: total bytes, image count and side. Returns x_train's layout."""
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    if total > MAX_NPZ_BYTES:
        listed = ", ".join(f"{k} {s} {d}" for k, (s, d) in headers.items() if k.startswith("x_"))
        raise NpzFormatError(f"{path}: its arrays would take {total / 2 ** 30:.1f} GiB once decompressed ({listed}), "
                             f"more than the {MAX_NPZ_BYTES / 2 ** 30:.0f} GiB read at most; refused before reading")
    layout = _layout(headers["x_train"][0], path, "x_train")
    for key in ("x_train", "x_test"):
        if key not in headers:
            continue
        shape = headers[key][0]
        if key == "x_test" and (_layout(shape, path, key) != layout or shape[1:] != headers["x_train"][0][1:]):
            raise NpzFormatError(f"{path}: x_test {shape} and x_train {headers['x_train'][0]} differ in image shape")
        sides = shape[1:3] if _layout(shape, path, key) == "NHWC" else shape[-2:]
        if shape[0] == 0 or shape[0] > MAX_NPZ_IMAGES or max(sides) > MAX_NPZ_SIDE:
            raise NpzFormatError(f"{path}: {key} has shape {shape}; expected 1..{MAX_NPZ_IMAGES:,} images of at most "
                                 f"{MAX_NPZ_SIDE} pixels a side")
    return layout


def _check_images(x: np.ndarray, path: Path, key: str) -> None:
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise NpzFormatError(f"{path}: {key} has dtype {x.dtype}; expected uint8 (0-255) or float in [0, 1]")
    if not np.isfinite(x).all():
        raise NpzFormatError(f"{path}: {key} holds NaN or infinite values; float images must be finite and lie in "
                             "[0, 1] (or store uint8 0-255)")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise NpzFormatError(f"{path}: {key} is {x.dtype} with values in [{lo:g}, {hi:g}]; float images must lie "
                             "in [0, 1] (or store uint8 0-255)")


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """(N,) labels as int64, after checking their range in their own type (uint64 values do not wrap)."""
    if y.ndim == 2 and y.shape[1] == 1:  # Keras writes (N, 1)
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise NpzFormatError(f"{path}: {key} must be {n} integer labels, got {y.dtype} {y.shape}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= MAX_CLASSES:
        raise NpzFormatError(f"{path}: {key} holds label {lo if lo < 0 else hi:,}, outside 0..{MAX_CLASSES - 1:,} "
                             f"(at most {MAX_CLASSES:,} classes)")
    return y.astype(np.int64)


def _class_names(arrays: dict[str, np.ndarray], ys: list[np.ndarray], default: list[str] | None,
                 path: Path) -> list[str]:
    """The classes: the file's names, else ``default``, else "0".."K-1"; every label within them, >= 2
    classes, each with at least one training image."""
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.ndim != 1 or cn.dtype.kind not in "US":
            raise NpzFormatError(f"{path}: class_names must be a 1-D array of strings, got {cn.dtype} {cn.shape}")
        names = [str(c) for c in cn.tolist()]
    else:
        names = list(default) if default else [str(i) for i in range(max(int(y.max()) for y in ys) + 1)]
    k = len(names)
    if any(int(y.max()) >= k for y in ys):
        raise NpzFormatError(f"{path}: labels lie outside 0..{k - 1} ({k} class names)")
    counts = np.bincount(ys[0], minlength=k)
    if k < 2 or (counts > 0).sum() < 2:
        raise NpzFormatError(f"{path}: the labels of y_train name {int((counts > 0).sum())} class(es); an audit "
                             "needs at least 2")
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(names[i] for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise NpzFormatError(f"{path}: {len(empty):,} of {k:,} classes have no image in y_train ({shown})")
    return names


def _open(path: Path) -> np.lib.npyio.NpzFile:
    try:
        f = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # ValueError: neither zip nor .npy (pickle)
        raise NpzFormatError(f"{path} is not a readable .npz file ({type(e).__name__})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise NpzFormatError(f"{path} holds a single array, not an .npz with x_train and y_train")
    return f


def _read(f: np.lib.npyio.NpzFile, path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of KEYS that the file has, after their headers passed; and x_train's layout."""
    keys = set(f.files)
    missing = {"x_train", "y_train"} - keys
    if missing:
        raise NpzFormatError(f"{path} has no {', '.join(sorted(missing))} (it holds: {', '.join(sorted(keys)) or 'nothing'})")
    if ("x_test" in keys) != ("y_test" in keys):
        raise NpzFormatError(f"{path}: x_test and y_test come together (it has only one of them)")
    layout = _check_headers({k: _header(f, k, path) for k in KEYS if k in keys}, path)
    try:
        return {k: f[k] for k in KEYS if k in keys}, layout
    except MemoryError:  # the headers passed, the machine has less: still a refusal, not a crash
        raise NpzFormatError(f"{path}: not enough memory to read its arrays") from None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:  # e.g. less data than the header says
        raise NpzFormatError(f"{path}: cannot read its arrays ({' '.join(str(e).split())[:120]})") from None


def read_npz(path: str | Path, default_names: list[str] | None = None) -> NpzArrays:
    """Read and check an image-set `.npz` (see module doc); raises NpzFormatError naming what is wrong.
    ``default_names``: the class names when the file has none (e.g. CIFAR-10's)."""
    path = Path(path)
    with _open(path) as f:
        arrays, layout = _read(f, path)
    xtr = arrays["x_train"]
    _check_images(xtr, path, "x_train")
    ytr = _labels(arrays["y_train"], len(xtr), path, "y_train")
    xte = yte = None
    if "x_test" in arrays:
        xte = arrays["x_test"]
        _check_images(xte, path, "x_test")
        yte = _labels(arrays["y_test"], len(xte), path, "y_test")
    names = _class_names(arrays, [ytr] + ([yte] if yte is not None else []), default_names, path)
    return NpzArrays(xtr, ytr, xte, yte, layout, names)
