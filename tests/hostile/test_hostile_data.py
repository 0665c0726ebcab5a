"""Hostile inputs, round two (issue 24): npz data sets, image sizes, KKT candidate counts and class names,
as data through the real audit CLI. The refusals must hold probe_runner's contract (exit 2, one
``error:`` line, no traceback, no training, --out intact); the memory ones also a peak far below what
the file or flag asked for (they are refused from headers and counts, before allocating)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_runner import REPO, check_intact, check_refused, make_previous_output, run_cli  # noqa: E402

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint  # noqa: E402
from tldr_core.attack.models import MLP  # noqa: E402

pytestmark = pytest.mark.slow  # one Python process per probe

AUDIT = ["-m", "tldr_core.cli.audit"]
TINY = ["--device", "cpu", "--steps", "3", "--per-class", "2", "--batch-size", "8", "--classifier-epochs", "1",
        "--membership-refs", "0"]  # LiRA's Ray stage (9 s an audit) is tested in tests/e2e/test_audit.py
#: Peak resident memory a refused probe may reach (importing torch is ~0.5 GB); the inputs ask for 6-3,900 GB.
PEAK_KB = 2_000_000


# ------------------------------------------------------------------------------ building bad inputs

def npz(**arrays: np.ndarray) -> Callable[[Path], list[str]]:
    """--dataset npz with these arrays (x_train defaults to 40 8x8 uint8 images)."""
    def build(tmp: Path) -> list[str]:
        arrays.setdefault("x_train", np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
        np.savez(tmp / "set.npz", **arrays)
        return ["--dataset", "npz", "--data-root", tmp / "set.npz", "--train-size", "10", *TINY]
    return build


def npy_header_only(shape: tuple[int, ...], descr: str = "|u1", body: bytes = b"\0" * 64) -> bytes:
    """A .npy member whose header declares ``shape`` but holds only ``body``: a few hundred bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + body


def npz_declaring(x_shape: tuple[int, ...]) -> Callable[[Path], list[str]]:
    """An .npz whose x_train header declares ``x_shape`` (and y_train as many labels), compressed."""
    def build(tmp: Path) -> list[str]:
        path = tmp / "bomb.npz"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x_train.npy", npy_header_only(x_shape))
            z.writestr("y_train.npy", npy_header_only((x_shape[0],), "<i8"))
        assert path.stat().st_size < 2000
        return ["--dataset", "npz", "--data-root", path, "--train-size", "10", *TINY]
    return build


LABELS = np.arange(40) % 2


def one_huge(value: int, dtype: type = np.int64) -> np.ndarray:
    y = LABELS.astype(dtype)
    y[7] = value
    return y


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def folder(*extra: str, names: tuple[str, str] = ("a", "b"), side: int = 6) -> Callable[[Path], list[str]]:
    """An image folder of two classes of four side x side grey PNGs."""
    def build(tmp: Path) -> list[str]:
        for c in names:
            (tmp / "faces" / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                (tmp / "faces" / c / f"{i}.png").write_bytes(png_bytes(np.full((side, side), 40 * i, np.uint8)))
        return ["--dataset", "image-folder", "--data-root", tmp / "faces", "--train-size", "4", *TINY, *extra]
    return build


def quiet(build: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    return lambda tmp: [*build(tmp), "--quiet"]


def kkt_flags(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["--dataset", "digits-8x8", "--train-size", "100", *TINY[:2], "--attack", "kkt", *argv]


# ------------------------------------------------------------------------------ the probes

#: (id, build, needle, whether the peak memory is checked). "--quiet" where the refusal comes from
#: building the classifier (after the "classifier: training" line, before any epoch).
PROBES: list[tuple[str, Callable[[Path], list[str]], str, bool]] = [
    # finding 1: one huge label made range(max + 1) class names (22.7 GB)
    ("npz-label-1e9", npz(y_train=one_huge(10 ** 9)), "label 1,000,000,000, outside 0..99,999", True),
    ("npz-label-2e62", npz(y_train=one_huge(2 ** 62)), "outside 0..99,999", True),
    # finding 13: uint64 labels wrapped to negative ("outside 0..-1 (0 class names)")
    ("npz-label-uint64", npz(y_train=one_huge(2 ** 63 + 5, np.uint64)), "label 9,223,372,036,854,775,813, outside", True),
    ("npz-label-negative", npz(y_train=one_huge(-3)), "label -3, outside 0..99,999", False),
    ("npz-labels-beyond-names", npz(y_train=LABELS + 1, class_names=np.array(["a", "b"])), "outside 0..1 (2 class", False),
    ("npz-empty-classes", npz(y_train=LABELS * 5), "4 of 6 classes have no image in y_train (1, 2, 3, 4)", False),
    # finding 2: the decompressed size is bounded from the headers, before reading
    ("npz-header-2M-1024x1024", npz_declaring((2_000_000, 1024, 1024)), "1953.1 GiB once decompressed", True),
    ("npz-zeros-1.9M-28x28", npz_declaring((1_900_000, 28, 28)), "1.4 GiB once decompressed", True),
    ("npz-side-above-256", npz(x_train=np.zeros((40, 300, 8), np.uint8), y_train=LABELS), "at most 256 pixels a side",
     False),
    ("npz-truncated-data", npz_declaring((40, 8, 8)), "cannot read its arrays", False),
    # finding 7: one class audited to "risk LOW ... nan%"
    ("npz-one-class", npz(y_train=np.zeros(40, np.int64)), "name 1 class(es); an audit needs at least 2", False),
    ("npz-one-class-of-cifar", npz(y_train=np.zeros(40, np.int64), class_names=np.array(list("abcdefghij"))),
     "an audit needs at least 2", False),
    # finding 13: NaN images were told "values in [0, 1]"
    ("npz-nan-images", npz(x_train=np.full((40, 8, 8), np.nan, np.float32), y_train=LABELS), "holds NaN or infinite",
     False),
    # finding 3: --image-size far beyond what an audit trains at (8.5 GB, then an allocator error)
    ("image-size-4096", folder("--image-size", "4096"), "each side must be within 1..256", False),
    ("image-folder-side-above-256", folder(side=300), "larger than the 256 pixels a side", False),
    # finding 10: a size the CNN cannot take (BatchNorm's "expected more than 1 value per channel")
    ("image-size-1", quiet(folder("--image-size", "1")), "needs images of at least 4x4, got 1x1", False),
    ("npz-1x1-images", quiet(npz(x_train=np.zeros((40, 1, 1), np.uint8), y_train=LABELS)),
     "needs images of at least 4x4, got 1x1", False),
    # finding 3: --kkt-per-class without a bound (6.1 GB, then an allocator error)
    ("kkt-per-class-10M", kkt_flags("--kkt-per-class", "10000000"), "per_class must be at most 1,000,000", True),
]


@pytest.mark.parametrize("name,build,needle,memory", PROBES, ids=[p[0] for p in PROBES])
def test_hostile_data_is_refused_cleanly(tmp_path, name, build, needle, memory):
    out = tmp_path / "out"
    before = make_previous_output(out)
    res = run_cli([*AUDIT, *build(tmp_path), "--out", out, "--overwrite"], cwd=tmp_path)
    check_refused(res, needle)
    check_intact(out, before)
    if memory:  # refused without allocating what was asked for
        assert res.peak_kb < PEAK_KB


def _classifier(tmp: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp / "model.pt", MLP((1, 8, 8), 10, hidden=16), CLASSIFIER_FORMAT, {})


def test_kkt_candidates_beyond_the_data_are_refused_before_allocating(tmp_path):
    """finding 3: 60,000 candidates per class for 10 training images per class (the attack starts, the
    candidates are never allocated)."""
    out = tmp_path / "out"
    before = make_previous_output(out)
    res = run_cli([*AUDIT, *kkt_flags("--kkt-per-class", "60000")(tmp_path), "--classifier", _classifier(tmp_path),
                   "--out", out, "--overwrite"], cwd=tmp_path)
    assert res.code == 2 and len(res.errors) == 1, res.stderr
    assert "60,000 candidates per class is more than 10 x the 10 training images per class" in res.errors[0]
    assert "Traceback" not in res.stderr and "kkt step" not in res.stdout
    assert res.peak_kb < PEAK_KB
    check_intact(out, before)


def test_a_nan_classifier_is_refused_not_blamed_on_the_learning_rate(tmp_path):
    """finding 13: NaN weights made the generator's loss NaN, and the message said to lower the learning rate."""
    path = _classifier(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["fc.0.weight"][0, 0] = float("nan")
    torch.save(payload, path)
    res = run_cli([*AUDIT, "--dataset", "digits-8x8", "--train-size", "100", *TINY, "--classifier", path,
                   "--out", tmp_path / "out"], cwd=tmp_path)
    check_refused(res, "weights hold NaN or infinite values (fc.0.weight)")
    assert "learning rate" not in res.stderr


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_class_names_with_dollars_are_drawn_as_text(tmp_path, source):
    """finding 9: "$...$" in a class name crashed matplotlib's mathtext after the whole attack ran."""
    names = ("$x_{$", "$\\frac{a}$")
    if source == "folder":
        args = folder(names=names)(tmp_path)
    else:
        args = npz(y_train=LABELS, class_names=np.array(names))(tmp_path)
    res = run_cli([*AUDIT, *args, "--out", tmp_path / "out"], cwd=tmp_path)
    assert res.code == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for f in ("grid.png", "nearest.png", "exposure.png", "report.html"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f


def test_ctrl_c_is_one_line_and_keeps_the_earlier_output(tmp_path):
    """finding 12: Ctrl-C printed a KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    before = make_previous_output(out)
    args = [sys.executable, *AUDIT, "--dataset", "digits-8x8", "--train-size", "100", "--device", "cpu",
            "--classifier-epochs", "1", "--steps", "100000", "--membership-refs", "0",  # no LiRA stage before it
            "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TLDR_RUNS": str(tmp_path)}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in p.stdout:  # wait until the attack runs
        if line.lstrip().startswith("step "):
            break
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    stdout, stderr = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 60
    assert p.returncode == 130, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted; --out holds the earlier output unless this audit had finished writing it"]
    assert "Traceback" not in stderr
    check_intact(out, before)
