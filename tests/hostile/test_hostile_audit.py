"""Hostile inputs to the audit CLI (issue 14), as data: malformed images, checkpoints, configs, flags and
output folders. Each probe runs ``python -m tldr_core.cli.audit`` on tiny inputs and must be refused
with exit status 2 and one ``error:`` line, no traceback, before any training, leaving the previous
audit in --out intact (probe_runner.py)."""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_runner import check_intact, check_refused, make_previous_output, run_cli  # noqa: E402

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, GENERATOR_FORMAT, save_checkpoint  # noqa: E402
from tldr_core.attack.models import MLP, ConditionedGenerator  # noqa: E402
from tldr_core.locks import FileLock  # noqa: E402

pytestmark = pytest.mark.slow  # one process per probe: ~0.4-3 s each, a minute in all

AUDIT = ["-m", "tldr_core.cli.audit"]
#: Tiny work settings, so a probe that wrongly gets through ends in seconds (and fails the checks).
TINY = ["--device", "cpu", "--steps", "3", "--per-class", "2", "--batch-size", "8", "--classifier-epochs", "1",
        "--membership-refs", "0"]  # LiRA's Ray stage (9 s an audit) is tested in tests/e2e/test_audit.py
DIGITS = ["--dataset", "digits-8x8", "--train-size", "100", *TINY]


# ------------------------------------------------------------------------------ building bad inputs

def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    """A 6x5 PNG cut in the middle of its pixel data (cutting only the end chunk still decodes)."""
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (6, 5), np.uint8))
    i = data.index(b"IDAT")
    return data[:i + 4 + struct.unpack(">I", data[i - 4:i])[0] // 2]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height in ~70 bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def image_folder(tmp: Path, odd: bytes | None = None, odd_name: str = "odd.png") -> Path:
    """Two classes of three 6x5 gray PNGs, plus one ``odd`` file in class b."""
    root = tmp / "faces"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(png_bytes(np.full((6, 5), 30 * i, np.uint8)))
    if odd is not None:
        (root / "b" / odd_name).write_bytes(odd)
    return root


def images(odd: bytes | None, *extra: str, name: str = "odd.png") -> Callable[[Path], list[str]]:
    return lambda tmp: ["--dataset", "image-folder", "--data-root", image_folder(tmp, odd, name), "--train-size", "4",
                        *TINY, *extra]


class Code:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint(edit: Callable[[dict, Path], None] | None = None, module: Callable[[], torch.nn.Module] | None = None,
               fmt: str = CLASSIFIER_FORMAT) -> Callable[[Path], list[str]]:
    """--classifier FILE: a digits MLP checkpoint, its payload changed by ``edit(payload, tmp)``."""
    def build(tmp: Path) -> list[str]:
        torch.manual_seed(0)
        path = save_checkpoint(tmp / "model.pt", (module or (lambda: MLP((1, 8, 8), 10, hidden=16)))(), fmt,
                               {"test_accuracy": 0.5})
        if edit is not None:
            payload = torch.load(path, weights_only=True)
            edit(payload, tmp)
            torch.save(payload, path)
        return [*DIGITS, "--classifier", path]
    return build


def put(**changes) -> Callable[[dict, Path], None]:
    def edit(payload: dict, tmp: Path) -> None:
        for key, value in changes.items():
            if key == "spec" and isinstance(value, dict):
                payload["spec"].update(value)
            else:
                payload[key] = value
    return edit


def config(text: str, *extra: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "attack.yaml").write_text(text)
        return ["--config", tmp / "attack.yaml", *extra]
    return build


def flags(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(argv)


# ------------------------------------------------------------------------------ the probes

PROBES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # images (finding 8, 10)
    ("image-undecodable", images(b"GIF89a but not really" * 4), "cannot read"),
    ("image-truncated", images(truncated_png()), "truncated"),
    ("image-decompression-bomb", images(png_header(100_000, 100_000)), "refused as a decompression bomb"),
    ("image-too-many-pixels", images(png_header(5000, 5000)), "is 5000x5000 pixels"),
    ("image-mixed-sizes", images(png_bytes(np.zeros((900, 1200), np.uint8))), "differ in size"),
    ("image-size-malformed", images(None, "--image-size", "64x"), "--image-size must be HxW"),
    ("image-size-too-large", images(None, "--image-size", "100000"), "each side must be within 1..256"),
    ("image-size-on-digits", flags(*DIGITS, "--image-size", "8"), "applies to --dataset image-folder only"),
    # checkpoints (finding 1, 10)
    ("ckpt-oversized-hidden", checkpoint(put(spec={"hidden": 2_000_000})), "'hidden' = 2000000 is outside"),
    ("ckpt-oversized-parameters", checkpoint(put(spec={"arch": "cnn", "width": 60_000, "hidden": 60_000})),
     "more than the limit of 100,000,000"),
    ("ckpt-wrong-shapes", checkpoint(put(spec={"hidden": 17})), "fc.0.weight is (16, 64), the spec implies (17, 64)"),
    ("ckpt-meta-list", checkpoint(put(meta=[1, 2, 3])), "'meta' must be a mapping with string keys, got list"),
    ("ckpt-meta-tensor", checkpoint(put(meta={"acc": torch.zeros(4)})), "'meta' must hold plain values"),
    ("ckpt-spec-not-mapping", checkpoint(put(spec=["mlp", 16])), "unknown classifier architecture None"),
    ("ckpt-state-not-mapping", checkpoint(put(state_dict="weights")), "state_dict must be a mapping"),
    ("ckpt-pickled-code", checkpoint(lambda p, t: p["meta"].__setitem__("x", Code(str(t / "pwned")))), "refused"),
    ("ckpt-generator-not-classifier",
     checkpoint(module=lambda: ConditionedGenerator("label", 10, (1, 8, 8), latent_dim=4, width=8), fmt=GENERATOR_FORMAT),
     "is not a tldr-classifier/1 checkpoint"),
    # configs (finding 10)
    ("config-device-int", config("device: 3\n"), "device must be auto, cpu or cuda, got 3"),
    ("config-seed-text", config("seed: abc\n"), "seed must be an integer, got 'abc'"),
    ("config-unknown-top-level-key", config("stepz: 10\n"), "unknown configuration key(s) ['stepz']"),
    ("config-weights-not-mapping", config("weights: [1, 2]\n"), "'weights' must be a mapping"),
    ("config-not-mapping", config("- steps\n- 3\n"), "must hold a mapping at the top level"),
    ("config-python-tag", config("steps: !!python/object/apply:os.system ['touch pwned']\n"), "not valid YAML"),
    ("config-nan-weight", config("weights:\n  kl: .nan\n"), "loss weight 'kl' must be finite"),
    # flags checked before the data loads (finding 10)
    ("flag-classifier-epochs-0", flags("--classifier-epochs", "0"), "--classifier-epochs must be >= 1, got 0"),
    ("flag-classifier-epochs-negative", flags("--classifier-epochs", "-5"), "--classifier-epochs must be >= 1"),
]


@pytest.mark.parametrize("name,build,needle", PROBES, ids=[p[0] for p in PROBES])
def test_hostile_input_is_refused_cleanly(tmp_path, name, build, needle):
    out = tmp_path / "out"
    before = make_previous_output(out)
    res = run_cli([*AUDIT, *build(tmp_path), "--out", out, "--overwrite"], cwd=tmp_path)
    check_refused(res, needle)
    check_intact(out, before)
    assert not (tmp_path / "pwned").exists()  # no pickled or YAML-tagged code ran
    if name.startswith("ckpt-oversized"):  # refused without allocating: the 25 GB model never existed
        assert res.peak_kb < 3_000_000


# ------------------------------------------------------------------------------ output folders (finding 5)

def test_an_existing_file_as_out_fails_at_once(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    res = run_cli([*AUDIT, "--out", f], cwd=tmp_path)
    check_refused(res, "exists and is not a folder")
    assert f.read_text() == "keep"


def test_an_out_under_proc_fails_at_once(tmp_path):
    check_refused(run_cli([*AUDIT, "--out", "/proc/tldr-audit"], cwd=tmp_path), "/proc/tldr-audit cannot be written")


def test_an_earlier_audit_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    before = make_previous_output(out)
    check_refused(run_cli([*AUDIT, "--out", out], cwd=tmp_path), "pass --overwrite")
    check_intact(out, before)


def test_overwrite_never_replaces_a_folder_with_other_files(tmp_path):
    out = tmp_path / "out"
    make_previous_output(out)
    (out / "thesis.tex").write_text("years of work")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    check_refused(run_cli([*AUDIT, "--out", out, "--overwrite"], cwd=tmp_path), "does not write (thesis.tex)")
    check_intact(out, before)


def test_a_second_audit_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    before = make_previous_output(out)
    with FileLock(tmp_path / ".out.lock").acquire():  # what a running audit holds
        res = run_cli([*AUDIT, "--out", out, "--overwrite"], cwd=tmp_path)
    check_refused(res, "another audit is writing to")
    check_intact(out, before)
