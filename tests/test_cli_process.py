"""tests/cli_process.py: a command forked from the server behaves like one in a new interpreter in what the
tests check: exit status, streams, folder, environment, arguments, atexit, its own peak memory and CPU
time, and a time limit that kills."""
from __future__ import annotations

import subprocess

import pytest

from cli_process import run_python as run_cli

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: open("atexit-ran", "w").close())
print("out", __name__, sys.argv[1:], os.getcwd(), os.environ.get("PROBE_VALUE"), repr(sys.stdin.read()))
print("err line", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "allocate":
    b = bytearray(600_000_000)
    b[::4096] = b"x" * len(b[::4096])
if sys.argv[1] == "sleep":
    import time
    time.sleep(60)
if sys.argv[1] == "spin":
    n = 0
    while n < 20_000_000:
        n += 1
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def test_a_script_gets_its_folder_arguments_environment_and_streams(tmp_path, script):
    work = tmp_path / "work"
    work.mkdir()
    res = run_cli([script, "exit", "3"], cwd=work, env={"PROBE_VALUE": "v1"})
    assert res.code == 3
    assert res.stdout == f"out __main__ ['exit', '3'] {work} v1 ''\n"
    assert res.stderr == "err line\n"
    assert (work / "atexit-ran").exists()  # the interpreter's normal exit
    again = run_cli([script, "exit"], cwd=tmp_path)  # nothing of the first request is left
    assert again.code == 0 and again.stdout.endswith(f"{tmp_path} None ''\n")


def test_an_uncaught_error_is_a_traceback_and_status_1(tmp_path, script):
    res = run_cli([script, "raise"], cwd=tmp_path)
    assert res.code == 1
    assert "Traceback" in res.stderr and res.stderr.rstrip().endswith("ValueError: boom")


def test_a_module_runs_afresh_as_main(tmp_path):
    res = run_cli(["-m", "tldr_core.cli.audit", "--help"], cwd=tmp_path)  # imported by the server already
    assert res.code == 0 and res.stdout.startswith("usage: ") and res.stderr == ""


def test_peak_memory_and_cpu_time_are_the_probes_own(tmp_path, script):
    # A child starts at the server's copied pages (~320 MB) and its exit touches more of them (~500 MB at the
    # end, measured), so an allocation of 600 MB shows as 400 MB over a run that allocates nothing; the
    # later, small run does not inherit the big one's peak.
    big = run_cli([script, "allocate"], cwd=tmp_path)
    small = run_cli([script, "exit"], cwd=tmp_path)
    assert big.peak_kb - small.peak_kb > 300_000
    spin = run_cli([script, "spin"], cwd=tmp_path)
    assert spin.cpu_seconds > small.cpu_seconds + 0.2  # 20 million loop turns: ~1 s


def test_a_probe_past_its_time_is_killed_and_the_server_goes_on(tmp_path, script):
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli([script, "sleep"], cwd=tmp_path, timeout=3)
    assert run_cli([script, "exit", "4"], cwd=tmp_path).code == 4


def test_a_new_interpreter_reports_its_own_peak_memory(tmp_path):
    """``-c`` commands (a new interpreter under the launcher): a 300 MB child followed by a tiny one reports the
    tiny one's peak, though this pytest process holds torch (~0.5 GB). On CI, RUSAGE_CHILDREN (the worker's
    largest child ever) and a child spawned straight from a 2 GB worker (Linux keeps the high-water RSS across
    exec) both read 2.4 GB."""
    big = run_cli(["-c", "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096])"], cwd=tmp_path)
    small = run_cli(["-c", "pass"], cwd=tmp_path)
    assert big.code == small.code == 0, big.stderr + small.stderr
    assert big.peak_kb > 290_000
    assert small.peak_kb < 100_000
