"""Running one hostile probe: the real CLI in a process of its own, and what every probe must show.

The process is forked from a server that has imported torch and the CLIs once (probe_server.py): a probe
then costs ~0.4 s instead of ~2.5 s, ~2 of them importing (measured: tests/hostile 248 s -> 92 s idle).

A probe passes when the command exits with status 2, stderr holds exactly one line starting with
``error:`` (and it contains the probe's needle, so it failed for the intended reason), neither stream
holds a ``Traceback``, and a previous audit output given as ``--out`` is byte for byte as it was, with
no staging folder left beside it.
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Runs each probe and writes its own peak memory (see its docstring for why a launcher).
LAUNCHER = Path(__file__).with_name("peak_launcher.py")
#: Runs the probes of installed commands: torch imported once per test process (see its docstring).
SERVER = Path(__file__).with_name("probe_server.py")
#: Every probe's environment: one thread, local Ray without auth, the checkout importable.
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
            "MLFLOW_DISABLE_TELEMETRY": "true"}
#: A probe must fail before any training (checked on stdout) and within this much CPU time. CPU time, not wall time: on shared cores a probe's wall time varies tenfold.
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
    """``python ARGS`` (e.g. ["-m", "tldr_core.cli.audit", ...]) with one thread, runs under ``cwd``.

    ``-m MODULE`` and script commands run in a child of this worker's fork server (probe_server.py: torch and
    the CLIs imported once); anything else (``-c CODE``) in a new interpreter under the peak launcher."""
    full = {**os.environ, **BASE_ENV, "TLDR_RUNS": str(cwd / "runs"), **(env or {})}
    if args and (args[0] == "-m" or str(args[0]).endswith(".py")):
        return _server().run([str(a) for a in args], cwd, full, timeout)
    t0, cpu0 = time.monotonic(), _children_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        p = subprocess.run([sys.executable, str(LAUNCHER), str(peak_file), sys.executable, *map(str, args)],
                           capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout)
        peak = int(peak_file.read_text())
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0, _children_cpu() - cpu0, peak)


class _ForkServer:
    """The client of probe_server.py: one server per test process, started on first use."""

    def __init__(self) -> None:
        env = {**os.environ, **BASE_ENV}
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        atexit.register(self.close)

    def _reply(self, deadline: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the probe fork server ended (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Result:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(t0 + 60)["pid"]
            try:
                done = self._reply(t0 + timeout)
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)  # the child leads its own group: it and what it started
                self._reply(time.monotonic() + 60)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            read = lambda p: p.read_bytes().decode("utf-8", errors="replace")  # noqa: E731
            return Result(done["code"], read(out), read(err), time.monotonic() - t0, done["cpu_seconds"],
                          done["peak_kb"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_SERVER: _ForkServer | None = None


def _server() -> _ForkServer:
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _ForkServer()
    return _SERVER


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
