"""A fork server for the suite's command runs (tests/cli_process.py): imports torch and the CLIs once, then
forks one child per command.

Why: a bad input is refused in well under a second, but a fresh interpreter spends ~2 s importing torch,
matplotlib and the package first; the ~80 probes of tests/hostile spent most of their time there. A child
forked from this process has those modules already, and then runs the command as ``python -m MODULE
ARGS`` or ``python SCRIPT ARGS`` would: its own process, working folder, environment, stdin from
/dev/null, stdout and stderr into files, the command's module executed afresh as ``__main__`` (removed
from ``sys.modules`` first, as in a new interpreter), and the interpreter's normal exit (atexit handlers,
flushed streams, the exit status of ``SystemExit``, a traceback and status 1 for an uncaught error).
PyTorch's DataLoader forks its workers the same way, after torch is imported.

Protocol, one JSON object per line: the client writes {"argv", "cwd", "env", "out", "err"} on stdin; this
process answers {"pid"} when the child starts and {"code", "peak_kb", "cpu_seconds"} when it ended
(``wait4``: the child's own peak resident memory, which starts at this process's size, as a real run's
does once it has imported the same modules, and its own CPU time). End of stdin ends the server.
"""
from __future__ import annotations

import gc
import json
import os
import runpy
import sys

# What the commands import before they check anything: loaded once, here. Not mlflow: its import starts a
# thread (jemalloc's), and a fork copies only the thread that forks.
import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402,F401
import tldr_core.cli.audit  # noqa: E402,F401
import tldr_core.cli.controls  # noqa: E402,F401
import tldr_core.cli.main  # noqa: E402,F401
import tldr_core.platform.registry.audits.reaudit_cli  # noqa: E402,F401
import tldr_core.platform.search.cli  # noqa: E402,F401

REPLIES = sys.stdout  # the child replaces fds 0-2; the server keeps its own streams


def serve() -> dict | None:
    """Answer requests until stdin ends (returns None); in a forked child, return that child's request."""
    # Out of the collector's reach: a child's collections (and its exit) would otherwise touch, and so copy,
    # every page of the imported modules' objects (0.7 s of a probe's CPU time instead of 0.3 s, measured).
    gc.freeze()
    for line in sys.stdin:
        request = json.loads(line)
        REPLIES.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), file=REPLIES, flush=True)
        _, status, usage = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": 128 - code if code < 0 else code, "peak_kb": usage.ru_maxrss,
                          "cpu_seconds": usage.ru_utime + usage.ru_stime}), file=REPLIES, flush=True)
    return None


def become(request: dict) -> None:
    """In the child: take the command's folder, environment and streams, then run it as __main__."""
    os.setsid()  # its own process group: a timed-out probe is killed with everything it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                           (2, request["err"], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(path, mode, 0o600), fd)
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                       buffering=1)
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        sys.modules.pop(argv[1], None)  # a new interpreter has not imported it: run it afresh
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    child_request = serve()
    if child_request is not None:
        become(child_request)  # exits as the command does: SystemExit or an uncaught error propagate
