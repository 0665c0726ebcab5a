"""Issue 14 findings 8 and 10: image folders are read by bit depth, mixed sizes are refused unless
--image-size names one size (then resized with a warning), and bad files (undecodable, truncated,
decompression bombs, oversized) are one DataError naming the file."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_core.attack import images as im
from tldr_core.attack.data import DataError, load_dataset
from tldr_core.attack.images import parse_image_size, read_image_folder


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height (8-bit gray) with a tiny IDAT: a few bytes that
    would decode to a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write(root: Path, cls: str, name: str, arr: np.ndarray, mode: str | None = None) -> Path:
    (root / cls).mkdir(parents=True, exist_ok=True)
    path = root / cls / name
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def two_classes(root: Path, size=(6, 5), n=2) -> None:
    for c in ("a", "b"):
        for i in range(n):
            write(root, c, f"{i}.png", np.full(size, 40 * i + (100 if c == "b" else 0), np.uint8))


def test_a_16_bit_png_keeps_its_brightness(tmp_path):
    dark = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 300)  # 0..8700 of 65535: dark, not white
    write(tmp_path, "a", "0.png", dark)
    write(tmp_path, "b", "0.png", np.full((6, 5), 65535, np.uint16))
    with Image.open(tmp_path / "a" / "0.png") as f:
        assert f.mode == "I;16"  # what Pillow gives; convert("L") would clip every value above 255 to white
    x, y, classes = read_image_folder(tmp_path)
    assert x.shape == (2, 1, 6, 5) and classes == ["a", "b"] and y.tolist() == [0, 1]
    assert torch.allclose(x[0, 0], torch.from_numpy(dark.astype(np.float32) / 65535), atol=1e-7)
    assert abs(float(x[0].mean()) - 4350 / 65535) < 1e-6 and float(x[1].min()) == 1.0


def test_16_bit_pgm_and_float_tiff_are_scaled_and_gray_joins_rgb(tmp_path):
    write(tmp_path, "a", "0.pgm", np.full((4, 4), 32768, np.uint16))  # opens as 32-bit mode "I"
    write(tmp_path, "a", "1.tif", np.full((4, 4), 1.5, np.float32), mode="F")  # clipped to 1
    write(tmp_path, "b", "0.png", np.full((4, 4, 3), (255, 0, 51), np.uint8))  # one RGB image: all become RGB
    x, _, _ = read_image_folder(tmp_path)
    assert x.shape == (3, 3, 4, 4)
    assert torch.allclose(x[0], torch.full((3, 4, 4), 32768 / 65535))
    assert torch.equal(x[1], torch.ones(3, 4, 4))
    assert torch.allclose(x[2, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_mixed_sizes_are_refused_naming_two_files_and_their_sizes(tmp_path):
    two_classes(tmp_path)
    write(tmp_path, "b", "9.png", np.zeros((900, 1200), np.uint8))
    with pytest.raises(DataError) as exc:
        read_image_folder(tmp_path)
    msg = str(exc.value)
    assert "a/0.png is 6x5" in msg and "b/9.png is 900x1200" in msg and "--image-size" in msg


def test_image_size_resizes_with_a_warning_that_counts(tmp_path):
    two_classes(tmp_path)
    write(tmp_path, "b", "9.png", np.full((12, 10), 77, np.uint8))
    with pytest.warns(UserWarning, match=r"resized 1 of 5 images to 6x5 \(--image-size\)"):
        x, _, _ = read_image_folder(tmp_path, (6, 5))
    assert x.shape == (5, 1, 6, 5) and torch.allclose(x[4], torch.full((1, 6, 5), 77 / 255))
    with pytest.warns(UserWarning, match="resized 5 of 5 images to 3x3"):
        assert read_image_folder(tmp_path, (3, 3))[0].shape == (5, 1, 3, 3)
    (tmp_path / "b" / "9.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image already has the size: nothing to say
        x2, _, _ = read_image_folder(tmp_path, (6, 5))
    assert torch.equal(x2, x[:4])


@pytest.mark.parametrize("text,want", [("28", (28, 28)), ("32x48", (32, 48)), (" 7 X 9 ", (7, 9))])
def test_parse_image_size(text, want):
    assert parse_image_size(text) == want


@pytest.mark.parametrize("text", ["", "0", "abc", "3x", "x3", "-4", "10000", "4x5x6", "2.5"])
def test_parse_image_size_rejects(text):
    with pytest.raises(DataError, match="--image-size"):
        parse_image_size(text)


def test_image_size_is_for_image_folders_only():
    with pytest.raises(DataError, match="--image-size applies to --dataset image-folder only"):
        load_dataset("digits-8x8", 100, image_size=(8, 8))


def _bad(tmp_path: Path, name: str, data: bytes) -> Path:
    two_classes(tmp_path)
    path = tmp_path / "b" / name
    path.write_bytes(data)
    return path


def test_an_undecodable_file_is_a_data_error_naming_it(tmp_path):
    path = _bad(tmp_path, "z.png", b"not an image at all" * 10)
    with pytest.raises(DataError, match=f"cannot read {path}"):
        read_image_folder(tmp_path)


def test_a_truncated_file_is_a_data_error_naming_it(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 5), dtype=np.uint8)).save(buf, "PNG")
    path = _bad(tmp_path, "z.png", buf.getvalue()[:-30])
    with pytest.raises(DataError, match=f"cannot read {path}: .*truncated"):
        read_image_folder(tmp_path)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = _bad(tmp_path, "z.png", png_header(100_000, 100_000))  # 10^10 pixels in ~70 bytes
    assert path.stat().st_size < 100
    with pytest.raises(DataError, match=f"{path} refused as a decompression bomb"):
        read_image_folder(tmp_path)


def test_pillows_bomb_warning_is_an_error_and_our_pixel_limit_holds(tmp_path, monkeypatch):
    path = _bad(tmp_path, "z.png", png_header(5000, 5000))  # below Pillow's limits, above MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=f"{path} is 5000x5000 pixels, more than the 16,777,216"):
        read_image_folder(tmp_path)
    path.write_bytes(png_header(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: Pillow only warns (DecompressionBombWarning)
    with pytest.raises(DataError, match="refused as a decompression bomb"):
        read_image_folder(tmp_path)


def test_a_folder_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    two_classes(tmp_path)
    monkeypatch.setattr(im, "MAX_FOLDER_VALUES", 100)
    monkeypatch.setattr(im, "_decode", lambda *a: pytest.fail("nothing may be decoded"))
    with pytest.raises(DataError, match="4 images of 6x5 would take .* pass a smaller --image-size"):
        read_image_folder(tmp_path)


def test_the_size_trained_at_is_at_most_max_side(tmp_path):
    """issue 24 #3: larger images need --image-size; an --image-size above the bound is refused too."""
    from tldr_core.attack.bounds import MAX_SIDE

    two_classes(tmp_path)
    with pytest.raises(DataError, match=f"--image-size {MAX_SIDE + 1}x4: each side must be at most {MAX_SIDE}"):
        read_image_folder(tmp_path, (MAX_SIDE + 1, 4))
    for f in tmp_path.rglob("*.png"):
        f.write_bytes(png_header(MAX_SIDE + 1, 5))  # headers only: refused before decoding
    with pytest.raises(DataError, match=f"are 5x{MAX_SIDE + 1}, larger than the {MAX_SIDE} pixels a side"):
        read_image_folder(tmp_path)
