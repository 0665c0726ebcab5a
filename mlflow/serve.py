"""Start the MLflow UI / tracking server on the searches' database (loopback only by default).

    python mlflow/serve.py                       # runs/mlflow.db on http://127.0.0.1:5000
    python mlflow/serve.py --port 5001 --db /path/to/mlflow.db
    python mlflow/serve.py --print-command       # show the `mlflow server` command instead

This folder holds scripts and configs only: it must never get an __init__.py (it would shadow the
mlflow package). The server reads the same sqlite database `tune/search.py` writes by default; run
artifacts are read from where the search stored them (runs/mlartifacts/), and experiments created
through the server store theirs under --artifacts-destination.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runs_dir() -> Path:
    return Path(os.environ.get("TLDR_RUNS") or ROOT / "runs").resolve()


def build_command(args: argparse.Namespace) -> list[str]:
    uri = args.backend_store_uri or f"sqlite:///{Path(args.db).resolve()}"
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [shutil.which("mlflow") or "mlflow"]
    cmd += ["server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
            "--workers", str(args.workers), "--serve-artifacts",
            "--artifacts-destination", Path(args.artifacts_destination).resolve().as_uri()]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # MLflow >= 3.5 rejects Host headers it does not know; name this machine's address too
        cmd += ["--allowed-hosts", f"{args.host}:{args.port},localhost:*,127.0.0.1:*"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python mlflow/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=str(runs_dir() / "mlflow.db"),
                   help="sqlite database the searches write (default runs/mlflow.db)")
    p.add_argument("--backend-store-uri", default=None, help="any MLflow backend store URI instead of --db")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the UI "
                        "to the network, without authentication)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--artifacts-destination", default=str(runs_dir() / "mlartifacts"),
                   help="artifact root for experiments created through the server (default runs/mlartifacts)")
    p.add_argument("--print-command", action="store_true", help="print the mlflow server command and exit")
    args = p.parse_args(argv)
    if not args.backend_store_uri and not Path(args.db).is_file():
        print(f"note: {args.db} does not exist yet (no search has run); the server creates an empty database",
              file=sys.stderr)
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    cmd = build_command(args)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # No background job runner (GenAI evaluation jobs): not needed to browse runs, and without it
    # the server stops at the first Ctrl-C instead of lingering.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI on http://{'127.0.0.1' if args.host in ('127.0.0.1', '0.0.0.0') else args.host}:{args.port}"
          f"  (database {args.backend_store_uri or Path(args.db).resolve()}; Ctrl-C stops it)", flush=True)
    os.execv(cmd[0], cmd) if os.path.isabs(cmd[0]) else os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
