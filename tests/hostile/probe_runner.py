"""Running one hostile probe: the real CLI in a subprocess, and what every probe must show.

A probe passes when the command exits with status 2, stderr holds exactly one line starting with
``error:`` (and it contains the probe's needle, so it failed for the intended reason), neither stream
holds a ``Traceback``, and a previous audit output given as ``--out`` is byte for byte as it was, with
no staging folder left beside it.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Runs each probe and writes its own peak memory (see its docstring for why a launcher).
LAUNCHER = Path(__file__).with_name("peak_launcher.py")
#: A probe must fail before any training (checked on stdout) and within this much CPU time: 3-6 s of
#: it is importing torch. CPU time, not wall time: on shared cores a probe's wall time varies tenfold.
MAX_CPU_SECONDS = 30.0
#: Wall-clock limit: only catches a hang.
TIMEOUT_SECONDS = 600.0
#: What a previous audit left in --out (contents checked after each probe).
PREVIOUS = {"metrics.json": '{"risk": "LOW"}', "report.html": "<html>earlier audit</html>", "grid.png": "png"}


def _children_cpu() -> float:  # CPU time adds up over children, so a difference gives this probe's
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    #: Peak resident memory of this probe's own process (not of every child the test worker ever ran).
    peak_kb: int

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT_SECONDS) -> Result:
    """``python ARGS`` (e.g. ["-m", "tldr_core.cli.audit", ...]) with one thread, runs under ``cwd``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "TLDR_RUNS": str(cwd / "runs"), "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true",
            **(env or {})}
    t0, cpu0 = time.monotonic(), _children_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        p = subprocess.run([sys.executable, str(LAUNCHER), str(peak_file), sys.executable, *map(str, args)],
                           capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout)
        peak = int(peak_file.read_text())
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0, _children_cpu() - cpu0, peak)


def make_previous_output(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in PREVIOUS.items():
        (folder / name).write_text(text)
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def check_refused(res: Result, needle: str) -> None:
    """Exit status 2, exactly one ``error:`` line containing ``needle``, no traceback, no training."""
    detail = f"\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-3000:]}"
    assert res.code == 2, f"exit status {res.code}{detail}"
    assert len(res.errors) == 1, f"{len(res.errors)} error: lines{detail}"
    assert needle in res.errors[0], f"{needle!r} not in {res.errors[0]!r}"
    assert "Traceback" not in res.stderr + res.stdout, detail
    for work in ("classifier: training", "classifier epoch", "attack: ", "step "):  # what the audit logs as it works
        assert work not in res.stdout, f"work was done ({work!r}){detail}"
    assert res.cpu_seconds < MAX_CPU_SECONDS, f"{res.cpu_seconds:.1f} s of CPU time"


def check_intact(folder: Path, before: dict[str, bytes]) -> None:
    assert snapshot(folder) == before
    stray = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")
             and not p.name.endswith(".lock")]
    assert stray == [], stray
