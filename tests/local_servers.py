"""What the tests that start servers on this machine share: free loopback ports, waiting until a started
process answers, stopping its process group, the command lines of running processes, and a private
PostgreSQL cluster (mlflow/postgres_server.py's `Cluster`).

Imported by name (`import local_servers`): pytest puts tests/ on sys.path for tests/conftest.py."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
POSTGRES_SERVER = REPO / "mlflow" / "postgres_server.py"


def free_ports(n: int) -> list[int]:
    """`n` different loopback ports nobody listens on (each socket stays bound until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _output(proc: subprocess.Popen, log: IO[str] | None) -> str:
    if log is not None:
        log.seek(0)
        return log.read()[-4000:]
    return proc.stdout.read()[-4000:] if proc.stdout is not None else ""


def wait_until_answers(proc: subprocess.Popen, answers: Callable[[], bool], what: str, timeout: float,
                       log: IO[str] | None = None, every: float = 1.0) -> None:
    """Call `answers()` (one request to the server; a refused or timed-out request counts as no) every
    `every` s until it says yes. Fails the test, with the process's output (`log`, else its stdout pipe),
    when the process exits first, and after `timeout` s."""
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{_output(proc, log)}")
        try:
            if answers():
                return
        except requests.RequestException:
            pass
        time.sleep(every)
    pytest.fail(f"{what} did not answer within {timeout:g} s")


def stop_process_group(proc: subprocess.Popen,
                       signals: tuple[tuple[int, float], ...] = ((signal.SIGTERM, 60), (signal.SIGKILL, 10))) -> None:
    """Stop the process group of `proc` (started with start_new_session=True): each signal in turn,
    waiting that many seconds for `proc` to exit before the next one."""
    for sig, wait in signals:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, arguments) of every process running now (those ending meanwhile are skipped)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield int(cmdline.parent.name), cmdline.read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue


def load_postgres_script(name: str = "postgres_server_script") -> ModuleType:
    """mlflow/postgres_server.py as a module (mlflow/ is not a package, by design)."""
    spec = importlib.util.spec_from_file_location(name, POSTGRES_SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def postgres_cluster(prefix: str) -> Iterator[tuple[ModuleType, object]]:
    """(the script's module, a started bare cluster: no MLflow) in a temp folder the postgres user can
    reach when the tests run as root; stopped and removed afterwards. The test fails when PostgreSQL
    does not start (not installed, ...)."""
    m = load_postgres_script()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(tmp, 0o755)
    cluster = m.Cluster(m.pg_bindir(), tmp / "data", free_port())
    try:
        cluster.start()
    except m.SetupError as exc:
        pytest.fail(f"PostgreSQL did not start: {exc}", pytrace=False)
    try:
        yield m, cluster
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
