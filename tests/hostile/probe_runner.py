"""Running one hostile probe: the real CLI in a process of its own, and what every probe must show.

The process is forked from a server that has imported torch and the CLIs once (tests/cli_process.py): a
probe then costs ~0.4 s instead of ~2.5 s, ~2 of them importing (measured: tests/hostile 248 s -> 92 s idle).

A probe passes when the command exits with status 2, stderr holds exactly one line starting with
``error:`` (and it contains the probe's needle, so it failed for the intended reason), neither stream
holds a ``Traceback``, and a previous audit output given as ``--out`` is byte for byte as it was, with
no staging folder left beside it.
"""
from __future__ import annotations

import os
from pathlib import Path

from cli_process import SERVER_ENV, Result, run_python

REPO = Path(__file__).resolve().parents[2]
#: Every probe's environment: the server's (one thread, the checkout importable) and a local Ray without auth.
BASE_ENV = {**SERVER_ENV, "RAY_AUTH_MODE": "disabled"}
#: A probe must fail before any training (checked on stdout) and within this much CPU time. CPU time, not
#: wall time: on shared cores a probe's wall time varies tenfold.
MAX_CPU_SECONDS = 30.0
#: Wall-clock limit: only catches a hang.
TIMEOUT_SECONDS = 600.0
#: What a previous audit left in --out (contents checked after each probe).
PREVIOUS = {"metrics.json": '{"risk": "LOW"}', "report.html": "<html>earlier audit</html>", "grid.png": "png"}


def run_cli(args: list, cwd: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT_SECONDS) -> Result:
    """``python ARGS`` (e.g. ["-m", "tldr_core.cli.audit", ...]) with one thread, runs under ``cwd``, its
    runs folder in ``cwd`` (tests/cli_process.py: module and script commands are forked from a server)."""
    return run_python(args, cwd, {**os.environ, **BASE_ENV, "TLDR_RUNS": str(cwd / "runs"), **(env or {})}, timeout)


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
