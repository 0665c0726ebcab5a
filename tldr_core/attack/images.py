"""Reading an image folder (``--dataset image-folder``): one sub-folder of images per class.

Image files are untrusted input, so reading is careful about what Pillow would otherwise do silently:

- **bit depth**: pixels are scaled by what the mode can hold (8-bit /255, 16-bit ``I;16*`` and ``I``
  /65535, float ``F`` clipped to [0, 1]); ``convert("L")`` would clip a 16-bit image to almost white.
- **sizes**: every image must have the same size, or ``image_size`` (``--image-size HxW``) names the
  one size to resize them to (bilinear with antialiasing), with a warning saying how many were resized.
  Without it, mixed sizes are an error naming two files and their sizes. Either way the size trained
  at is at most ``bounds.MAX_SIDE`` a side.
- **bad files**: undecodable or truncated files, decompression bombs (Pillow's warning is an error
  here) and images above :data:`MAX_IMAGE_PIXELS` are a :class:`DataError` naming the file, checked
  from the headers before anything large is decoded; so is a folder whose tensor would exceed
  :data:`MAX_FOLDER_VALUES`.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tldr_core.attack.bounds import MAX_SIDE
from tldr_core.attack.data_errors import DataError
from tldr_core.attack.model_specs import LIMITS

IMG_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
#: Largest image (pixels, from its header) that is decoded at all; a model input side is at most LIMITS["side"].
MAX_IMAGE_PIXELS = LIMITS["side"] ** 2
#: Largest folder tensor (N x C x H x W float32 values, 4 GiB); beyond it, pass a smaller --image-size.
MAX_FOLDER_VALUES = 1 << 30
#: Modes read as one channel (the rest are converted to RGB).
GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def parse_image_size(text: str) -> tuple[int, int]:
    """"HxW" or one number N (N x N) -> (H, W), each within 1..MAX_SIDE; DataError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise DataError(f"--image-size must be HxW (e.g. 64x48) or one number for a square, got {text!r}")
    h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise DataError(f"--image-size {h}x{w}: each side must be within 1..{MAX_SIDE} (the largest size an audit "
                        "trains at; docs/security.md)")
    return h, w


def _class_files(root: Path) -> tuple[list[str], list[list[Path]]]:
    classes, files = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTS)
        if not imgs:
            warnings.warn(f"image-folder: {d} holds no images; skipped", stacklevel=4)
            continue
        classes.append(d.name)
        files.append(imgs)
    if len(classes) < 2:
        raise DataError(f"image-folder: {root} needs >= 2 class subfolders with images "
                        f"({', '.join(IMG_EXTS)}), found {len(classes)}")
    return classes, files


def _open(path: Path):
    """Pillow's image (header read only), with a decompression-bomb warning raised as an error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    from PIL import Image

    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DataError(f"image-folder: {path} refused as a decompression bomb ({exc})")
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return DataError(f"image-folder: cannot read {path}: {text}")


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (H, W)) from the file's header; nothing is decoded."""
    try:
        with _open(path) as im:
            mode, (w, h) = im.mode, im.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem
        raise _unreadable(path, exc) from None
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"image-folder: {path} is {h}x{w} pixels, more than the {MAX_IMAGE_PIXELS:,} read at most; "
                        "shrink it first")
    return mode, (h, w)


def _pixels(im, color: bool) -> np.ndarray:
    """float32 (H, W) or (H, W, 3) in [0, 1], scaled by the mode's bit depth."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNG / TIFF / PGM (PGM opens as 32-bit "I")
        a = np.clip(np.asarray(im).astype(np.float32) / np.float32(65535.0), 0.0, 1.0)
    elif mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0.0, 1.0)
    else:
        a = np.asarray(im.convert("RGB" if color else "L"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    if color and a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a


def _decode(path: Path, color: bool) -> np.ndarray:
    try:
        with _open(path) as im:
            im.load()  # a truncated file fails here
            return _pixels(im, color)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None


def _target_size(sizes: dict[Path, tuple[int, int]], image_size: tuple[int, int] | None,
                 root: Path) -> tuple[int, int]:
    """``image_size``, else the one size every image has; mixed sizes without it are an error."""
    if image_size is not None:
        if max(image_size) > MAX_SIDE:
            raise DataError(f"--image-size {image_size[0]}x{image_size[1]}: each side must be at most {MAX_SIDE}")
        return image_size
    first = next(iter(sizes))
    other = next((f for f, s in sizes.items() if s != sizes[first]), None)
    if other is not None:
        (h1, w1), (h2, w2) = sizes[first], sizes[other]
        raise DataError(f"image-folder: images in {root} differ in size, e.g. {first.relative_to(root)} is "
                        f"{h1}x{w1} and {other.relative_to(root)} is {h2}x{w2} (HxW); pass --image-size HxW to "
                        "resize them all to one size")
    h, w = sizes[first]
    if max(h, w) > MAX_SIDE:
        raise DataError(f"image-folder: the images in {root} are {h}x{w}, larger than the {MAX_SIDE} pixels a side an "
                        f"audit trains at; pass --image-size HxW (each side at most {MAX_SIDE}) to resize them")
    return h, w


def read_image_folder(root: str | Path, image_size: tuple[int, int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images float32 (N, C, H, W) in [0, 1], labels int64 (N,), class names) of the folder ``root``.

    C is 1 when every image is grayscale, else 3. ``image_size`` (H, W): resize every image whose size
    differs (warning with the count); None: all images must have one size (see the module doc)."""
    root = Path(root)
    classes, files = _class_files(root)
    headers = {f: _header(f) for fs in files for f in fs}  # headers only; each file is closed again
    color = not {mode for mode, _ in headers.values()} <= GRAY_MODES
    sizes = {f: size for f, (_, size) in headers.items()}
    h, w = _target_size(sizes, image_size, root)
    values = len(sizes) * (3 if color else 1) * h * w
    if values > MAX_FOLDER_VALUES:
        raise DataError(f"image-folder: {len(sizes)} images of {h}x{w} would take {4 * values / 2 ** 30:.1f} GiB "
                        f"(at most {4 * MAX_FOLDER_VALUES / 2 ** 30:.0f}); pass a smaller --image-size")
    arrays, labels, resized = [], [], 0
    for c, fs in enumerate(files):
        for f in fs:
            t = torch.from_numpy(_decode(f, color))
            t = t.permute(2, 0, 1) if color else t[None]
            if tuple(t.shape[1:]) != (h, w):
                t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
                t = t.clamp_(0.0, 1.0)
                resized += 1
            arrays.append(t)
            labels.append(c)
    if resized:
        warnings.warn(f"image-folder: resized {resized} of {len(arrays)} images to {h}x{w} (--image-size)",
                      stacklevel=3)
    return torch.stack(arrays).contiguous(), torch.tensor(labels, dtype=torch.long), classes
