"""Issue 14 findings 5 and 10 through the real audit: --out is refused before any data is loaded when it
already holds an audit (unless --overwrite), a crash while writing leaves the previous output exactly as
it was, and --classifier-epochs < 1 is refused before the data loads."""
from __future__ import annotations

import json

import pytest
import torch

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
from tldr_core.attack.models import MLP
from tldr_core.cli import audit
from tldr_core.report import audit_files

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = ["--dataset", "digits-8x8", "--train-size", "100", "--device", "cpu", "--steps", "3", "--per-class", "2",
        "--batch-size", "8", "--membership-refs", "0"]  # LiRA on Ray: tests/e2e/test_audit.py


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("clf") / "raw.pt", MLP((1, 8, 8), 10).eval(), CLASSIFIER_FORMAT)


def _run(argv, capsys):
    code = audit.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the audit gets as far as loading data."""
    monkeypatch.setattr(audit, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))


@pytest.mark.slow
def test_a_second_audit_needs_overwrite_and_a_failed_one_keeps_the_first(classifier, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    code, _, err = _run([*TINY, "--classifier", classifier, "--seed", 1, "--out", out], capsys)
    assert code == 0, err
    first = snapshot(out)
    assert set(first) == set(audit.OUTPUT_FILES)

    with monkeypatch.context() as m:  # refused before any work, the first output untouched
        m.setattr(audit, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the --out check"))
        code, _, err = _run([*TINY, "--classifier", classifier, "--out", out], capsys)
    assert code == 2 and err.startswith(f"error: --out {out} already holds {len(first)} file(s)") and "--overwrite" in err
    assert snapshot(out) == first

    def crash(*a, **k):
        raise RuntimeError("disk trouble while writing report.html")

    with monkeypatch.context() as m:  # the attack runs, then writing fails half-way: nothing of it shows
        m.setattr(audit_files, "render_report", crash)
        code, _, err = _run([*TINY, "--classifier", classifier, "--seed", 2, "--out", out, "--overwrite"], capsys)
    assert code == 2 and err == "error: disk trouble while writing report.html\n"
    assert snapshot(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.lock", "o"]  # no staging folder left

    code, _, err = _run([*TINY, "--classifier", classifier, "--seed", 2, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert set(snapshot(out)) == set(first) and snapshot(out) != first
    assert json.loads((out / "metrics.json").read_text())["settings"]["seed"] == 2


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_classifier_epochs_below_one_is_refused_before_the_data_loads(tmp_path, capsys, no_data, epochs):
    code, _, err = _run(["--classifier-epochs", epochs, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err == f"error: --classifier-epochs must be >= 1, got {epochs}\n"
    assert not (tmp_path / "o").exists()


def test_an_out_that_is_a_file_is_refused_before_the_data_loads(tmp_path, capsys, no_data):
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    code, _, err = _run(["--out", f], capsys)
    assert code == 2 and err == f"error: --out {f} exists and is not a folder\n"
    assert f.read_text() == "keep me"


def test_a_bad_image_size_is_refused_before_the_data_loads(tmp_path, capsys, no_data):
    code, _, err = _run(["--dataset", "image-folder", "--image-size", "64x", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith("error: --image-size must be HxW")
