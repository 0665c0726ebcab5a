"""Hostile inputs to `tldr controls` (issue 24 #5, #6, #11): the audit's --out contract, explicit flags
against --smoke-test, and one ``error:`` line where there were tracebacks, through the real CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_runner import check_refused, run_cli  # noqa: E402

from tldr_core.cli import controls  # noqa: E402
from tldr_core.locks import FileLock  # noqa: E402

CONTROLS = ["-m", "tldr_core.cli.controls"]
#: The quickest real run: the shrunk leaky-fc control, the weight-template attack only (seconds).
QUICK = ["--smoke-test", "--controls", "leaky-fc", "--attacks", "templates"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ --out (finding 5, 11)

@pytest.mark.slow
def test_a_second_run_into_a_used_folder_is_refused_and_the_first_table_survives(tmp_path):
    out = tmp_path / "controls"
    kkt = [*QUICK, "--attacks", "kkt", "--kkt-steps", "2"]  # KKT leaves files in <out>/leaky-fc/kkt/
    first = run_cli([*CONTROLS, *kkt, "--out", out], cwd=tmp_path)
    assert first.code == 0, first.stderr[-3000:]
    rows = json.loads((out / "controls.json").read_text())["rows"]
    attacks = [r for r in rows if r["attack"] in controls.ATTACKS]
    assert [r["attack"] for r in attacks] == ["kkt"] and attacks[0]["steps"] == 2  # --kkt-steps beat --smoke-test
    before = snapshot(out)
    check_refused(run_cli([*CONTROLS, *QUICK, "--out", out], cwd=tmp_path), "pass --overwrite")
    assert snapshot(out) == before and (out / "leaky-fc" / "kkt" / "kkt.pt").is_file()
    # with --overwrite the new run replaces it: its table only, the earlier cell folders gone
    again = run_cli([*CONTROLS, *QUICK, "--out", out, "--overwrite"], cwd=tmp_path)
    assert again.code == 0, again.stderr[-3000:]
    rows = json.loads((out / "controls.json").read_text())["rows"]
    assert [r["attack"] for r in rows if r["attack"] in controls.ATTACKS] == ["templates"]
    assert not (out / "leaky-fc" / "kkt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".controls.")] == [".controls.lock"]


@pytest.mark.slow
def test_an_existing_file_as_out_is_one_error_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    check_refused(run_cli([*CONTROLS, *QUICK, "--out", f], cwd=tmp_path), "exists and is not a folder")
    assert f.read_text() == "keep"


@pytest.mark.slow
def test_overwrite_never_replaces_a_folder_with_other_files(tmp_path):
    out = tmp_path / "controls"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    check_refused(run_cli([*CONTROLS, *QUICK, "--out", out, "--overwrite"], cwd=tmp_path),
                  "does not write (thesis.tex)")
    assert snapshot(out) == {"thesis.tex": b"years of work"}


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_runs(tmp_path):
    with FileLock(tmp_path / ".controls.lock").acquire():  # what a running controls run holds
        res = run_cli([*CONTROLS, *QUICK, "--out", tmp_path / "controls"], cwd=tmp_path)
    check_refused(res, "another controls run is writing to")


# ------------------------------------------------------------------------------ bounds (finding 3, 11)

@pytest.mark.slow
@pytest.mark.parametrize("argv,needle", [
    (["--kkt-per-class", "10000000"], "kkt: per_class must be at most 1,000,000"),
    (["--kkt-per-class", "0"], "--kkt-per-class must be >= 1, got 0"),
    (["--kkt-steps", "0"], "--kkt-steps must be >= 1, got 0"),
    (["--per-class", "-1"], "--per-class must be >= 1, got -1"),
    # data-dependent: the shrunk leaky-fc control has 10 training images per class; refused before training
    (["--kkt-per-class", "60000"], "60,000 candidates per class is more than 10 x the 10 training images"),
])
def test_flags_beyond_their_bounds_are_one_error_line_before_any_training(tmp_path, argv, needle):
    out = tmp_path / "controls"
    res = run_cli([*CONTROLS, "--smoke-test", "--controls", "leaky-fc", "--attacks", "kkt", *argv, "--out", out],
                  cwd=tmp_path)
    check_refused(res, needle)
    assert not out.exists()  # nothing was written, not even an empty folder


# ------------------------------------------------------------------------------ --smoke-test (finding 6)

@pytest.mark.parametrize("argv,want", [
    ([], {"dataset": "digits-8x8", "kkt_steps": 30, "tldr_steps": 20, "per_class": 4, "data_root": None}),
    (["--kkt-steps", "0"], {"kkt_steps": 0}),
    (["--kkt-steps", "3"], {"kkt_steps": 3, "tldr_steps": 20}),
    (["--kkt-steps", str(controls.KKTConfig.steps)], {"kkt_steps": controls.KKTConfig.steps}),  # = the default
    (["--dataset", "npz", "--data-root", "F.npz"], {"dataset": "npz", "data_root": "F.npz", "kkt_steps": 30}),
    (["--tldr-steps", "7", "--per-class", "9"], {"tldr_steps": 7, "per_class": 9}),
])
def test_smoke_test_keeps_every_explicit_flag(argv, want):
    args = controls.parse(["--smoke-test", *argv])
    assert {k: getattr(args, k) for k in want} == want


@pytest.mark.usefixtures("one_thread")
def test_smoke_test_runs_the_npz_it_was_given(tmp_path, tmp_cache):
    """The reported data set is the one that ran: an npz of 8x8 images under --smoke-test."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 40)
    np.savez(tmp_path / "set.npz", x_train=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y_train=y)
    out = tmp_path / "controls"
    assert controls.main([*QUICK, "--dataset", "npz", "--data-root", str(tmp_path / "set.npz"), "--out", str(out)]) == 0
    table = json.loads((out / "controls.json").read_text())
    assert table["meta"]["dataset"] == "npz"
    assert Path(table["rows"][0]["classifier"]["path"]).name.startswith("npz-100-fc-")  # trained on the npz
