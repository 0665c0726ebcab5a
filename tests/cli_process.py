"""Running ``python -m MODULE ...`` or ``python SCRIPT ...`` in tests the fast way: each command in a process
of its own, forked from a server that imported torch and the package's CLIs once (fork_server.py), so a
command refused in 0.1 s no longer spends ~2 s importing first (tests/hostile: 248 s -> 92 s, measured).

`run_python` is ``subprocess.run([sys.executable, *args], capture_output=True, text=True)`` for the suite,
with the command's own peak memory and CPU time (`Result`). ``-c CODE`` runs in a new interpreter under
peak_launcher.py. tests/test_cli_process.py shows what the fork keeps of a new interpreter.
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

REPO = Path(__file__).resolve().parents[1]
#: Runs a ``-c`` command and writes its own peak memory (see its docstring for why a launcher).
LAUNCHER = Path(__file__).with_name("peak_launcher.py")
#: Forks the module and script commands (see its docstring).
SERVER = Path(__file__).with_name("fork_server.py")
#: The server's own environment: one thread (each command brings its own environment).
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
              "MLFLOW_DISABLE_TELEMETRY": "true"}


def _children_cpu() -> float:  # CPU time adds up over children, so a difference gives this command's
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    #: Peak resident memory of this command's own process (not of every child the test worker ever ran).
    peak_kb: int

    @property
    def returncode(self) -> int:  # subprocess.CompletedProcess's name for it
        return self.code

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_python(args: list, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 600.0) -> Result:
    """``python ARGS`` in ``cwd`` with ``env`` (default: this process's folder and environment), like
    ``subprocess.run([sys.executable, *ARGS], capture_output=True, text=True, ...)``.

    ``-m MODULE ...`` and ``SCRIPT.py ...`` run in a child of this process's fork server (fork_server.py);
    anything else (``-c CODE``) in a new interpreter under the peak launcher (peak_launcher.py)."""
    argv, cwd = [str(a) for a in args], Path(cwd or os.getcwd())
    full = dict(os.environ if env is None else env)
    if argv and (argv[0] == "-m" or argv[0].endswith(".py")):
        return _server().run(argv, cwd, full, timeout)
    t0, cpu0 = time.monotonic(), _children_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        p = subprocess.run([sys.executable, str(LAUNCHER), str(peak_file), sys.executable, *argv],
                           capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout)
        peak = int(peak_file.read_text())
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0, _children_cpu() - cpu0, peak)


class _ForkServer:
    """The client of fork_server.py: one server per test process, started on first use."""

    def __init__(self) -> None:
        env = {**os.environ, **SERVER_ENV}
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO)
        atexit.register(self.close)

    def _reply(self, deadline: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (status {self.proc.wait()})")
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
