"""mlflow/postgres_server.py: a PostgreSQL-backed MLflow server on loopback, used by a tiny search
(tune/search.py --tracking-uri http://127.0.0.1:PORT) and by tune/reaudit.py --dry-run.

PostgreSQL must be installable here (the script runs `apt-get install -y postgresql` as root when
it is missing) and psycopg2-binary installed: otherwise this test FAILS with the script's message."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "mlflow" / "postgres_server.py"
TINY = ["--smoke-test", "--trials", "1", "--steps", "8", "--train-size", "100", "--per-class", "3", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_server(tmp_path):
    port = free_port()
    env = {**os.environ, "TLDR_RUNS": str(tmp_path / "runs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port),
                             "--artifacts-destination", str(tmp_path / "pg" / "mlartifacts")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    t0, ready = time.time(), False
    while time.time() - t0 < 240 and not ready:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        log.append(line)
        ready = line.startswith("MLflow tracking server ready:")
    if not ready:
        proc.kill()
        errors = [ln.strip() for ln in log if ln.startswith("error:")]
        pytest.fail("the PostgreSQL-backed MLflow server did not start: "
                    + (errors[-1] if errors else "".join(log[-15:])[-2000:]))
    yield f"http://127.0.0.1:{port}", tmp_path
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, "".join(log[-20:])
    (data,) = [ln.split("(data ", 1)[1].split(")")[0] for ln in log if ln.startswith("PostgreSQL ready:")]
    assert not Path(data, "postmaster.pid").exists(), "PostgreSQL was not stopped"
    assert not Path(data).exists()  # the temp cluster is removed


@pytest.mark.slow
def test_smoke_search_against_postgres_backed_server(pg_server):
    from mlflow import MlflowClient

    uri, tmp_path = pg_server
    env = {**os.environ, "TLDR_RUNS": str(tmp_path / "runs"), "TLDR_CACHE": str(tmp_path / "cache"),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, str(REPO / "tune" / "search.py"), "--tracking-uri", uri, *TINY],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tldr-mnist-bundled")
    (search,) = c.search_runs([exp.experiment_id], "tags.`tldr.role` = 'search'")
    assert search.info.status == "FINISHED" and search.data.tags["tldr.state"] == "finished"
    trials = c.search_runs([exp.experiment_id], f"tags.`tldr.search_run` = '{search.info.run_id}'")
    assert len(trials) == 1
    champion = c.get_model_version_by_alias("tldr-generator-mnist-bundled", "champion")
    assert champion.tags["search_run"] == search.info.run_id
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # everything went to the server
    # the re-audit sees the classifier the search registered there
    out = subprocess.run([sys.executable, str(REPO / "tune" / "reaudit.py"), "--tracking-uri", uri, "--dry-run"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0 and "1 version(s) to audit" in out.stdout, out.stdout + out.stderr
