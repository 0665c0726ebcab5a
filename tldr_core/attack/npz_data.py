"""Image sets stored as one NumPy `.npz` file: `--dataset npz --data-root FILE.npz`.

The file holds `x_train` and `y_train`, and optionally `x_test` / `y_test` and `class_names`:

- images: uint8 in [0, 255] (or float in [0, 1]), shaped (N, H, W) for grey, (N, H, W, C) as Keras and
  most exports write them, or (N, C, H, W) as PyTorch does, with C = 1 or 3;
- labels: integers 0..K-1, one per image;
- class_names: K strings (else the classes are named "0".."K-1").

With a test split the file is split like the official torchvision sets (T and H' from x_train, the
test set from x_test); without one, like an image folder (all three from x_train). The file is read
with `allow_pickle=False`: an `.npz` carrying pickled objects is refused, never unpickled.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_NPZ_IMAGES = 2_000_000  # a bound on what one file may ask us to hold (CIFAR-10 has 60,000)
MAX_NPZ_SIDE = 1024


class NpzFormatError(ValueError):
    """The file is not an image set in the layout described in this module's docstring."""


@dataclass
class NpzArrays:
    x_train: np.ndarray  # uint8 or float, (N, H, W) / (N, H, W, C) / (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    layout: str  # "NHW", "NHWC" or "NCHW"
    class_names: list[str] | None


def _layout(x: np.ndarray, path: Path, key: str) -> str:
    if x.ndim == 3:
        return "NHW"
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return "NHWC"
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return "NCHW"
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return "NHWC"
    raise NpzFormatError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                         "with C = 1 or 3")


def _check_images(x: np.ndarray, path: Path, key: str) -> None:
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        lo, hi = float(np.nanmin(x)) if x.size else 0.0, float(np.nanmax(x)) if x.size else 0.0
        if np.isnan(x).any() or lo < 0.0 or hi > 1.0:
            raise NpzFormatError(f"{path}: {key} is {x.dtype} with values in [{lo:g}, {hi:g}]; float images must lie "
                                 "in [0, 1] (or store uint8 0-255)")
    else:
        raise NpzFormatError(f"{path}: {key} has dtype {x.dtype}; expected uint8 (0-255) or float in [0, 1]")
    if len(x) == 0 or len(x) > MAX_NPZ_IMAGES or max(x.shape[1:]) > MAX_NPZ_SIDE:
        raise NpzFormatError(f"{path}: {key} has shape {x.shape}; expected 1..{MAX_NPZ_IMAGES:,} images of at most "
                             f"{MAX_NPZ_SIDE} pixels a side")


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras writes (N, 1)
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise NpzFormatError(f"{path}: {key} must be {n} integer labels, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def read_npz(path: str | Path) -> NpzArrays:
    """Read and check an image-set `.npz` (see module doc); raises NpzFormatError naming what is wrong."""
    path = Path(path)
    try:
        f = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # ValueError: neither zip nor .npy (pickle)
        raise NpzFormatError(f"{path} is not a readable .npz file ({type(e).__name__})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise NpzFormatError(f"{path} holds a single array, not an .npz with x_train and y_train")
    with f:
        keys = set(f.files)
        missing = {"x_train", "y_train"} - keys
        if missing:
            raise NpzFormatError(f"{path} has no {', '.join(sorted(missing))} (it holds: {', '.join(sorted(keys)) or 'nothing'})")
        if ("x_test" in keys) != ("y_test" in keys):
            raise NpzFormatError(f"{path}: x_test and y_test come together (it has only one of them)")
        try:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test", "class_names") if k in keys}
        except ValueError as e:  # object arrays need pickle: refused
            raise NpzFormatError(f"{path}: {e} (object arrays are refused; store numbers and strings)") from e
    xtr, layout = arrays["x_train"], _layout(arrays["x_train"], path, "x_train")
    _check_images(xtr, path, "x_train")
    ytr = _labels(arrays["y_train"], len(xtr), path, "y_train")
    xte = yte = None
    if "x_test" in arrays:
        xte = arrays["x_test"]
        _check_images(xte, path, "x_test")
        if _layout(xte, path, "x_test") != layout or xte.shape[1:] != xtr.shape[1:]:
            raise NpzFormatError(f"{path}: x_test {xte.shape} and x_train {xtr.shape} differ in image shape")
        yte = _labels(arrays["y_test"], len(xte), path, "y_test")
    names = None
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.ndim != 1 or cn.dtype.kind not in "US":
            raise NpzFormatError(f"{path}: class_names must be a 1-D array of strings, got {cn.dtype} {cn.shape}")
        names = [str(c) for c in cn.tolist()]
    return NpzArrays(xtr, ytr, xte, yte, layout, names)
