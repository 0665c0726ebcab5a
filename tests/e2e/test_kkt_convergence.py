"""bench/kkt_convergence.py at smoke size: chunks of a resumable KKT run, scored after each, and a second
call with --resume continuing the first from its kkt.pt (same numbers as one uninterrupted run)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _bench():
    spec = importlib.util.spec_from_file_location("kkt_convergence", ROOT / "bench" / "kkt_convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "convergence.csv").open() as f:
        return list(csv.DictReader(f))


def test_chunks_are_scored_and_a_resumed_run_continues_the_first(tmp_path, tmp_cache):
    bench = _bench()
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert bench.main(["--smoke-test", "--out", str(whole)]) == 0  # 2 chunks of 20 steps
    rows = _rows(whole)
    assert [int(r["steps"]) for r in rows] == [20, 40] and (whole / "convergence.png").stat().st_size > 2000
    assert {"residual", "matched_train_060", "matched_heldout_060", "exposure_tpr"} <= set(rows[0])
    # the first 20 steps, then --resume for the rest: the last chunk's numbers are the uninterrupted run's
    assert bench.main(["--smoke-test", "--steps", "20", "--out", str(half)]) == 0
    assert bench.main(["--smoke-test", "--resume", str(half / "kkt.pt"), "--out", str(half / "more")]) == 0
    more = _rows(half / "more")
    assert [int(r["steps"]) for r in more] == [40]
    assert float(more[0]["residual"]) == pytest.approx(float(rows[1]["residual"]), rel=1e-6)
    assert more[0]["matched_train_040"] == rows[1]["matched_train_040"]
