"""mlflow/postgres_server.py: a PostgreSQL-backed MLflow server on loopback, used by a tiny search
(tune/search.py --tracking-uri http://127.0.0.1:PORT) and by tune/reaudit.py --dry-run, and the
cluster's security: no connection without the generated password, an owner that is not a superuser
(no `COPY ... TO PROGRAM`), private socket folder and credentials file, no password on a command line.

PostgreSQL (initdb, pg_ctl) and psycopg2-binary must be installed (CI's .ci/run installs PostgreSQL;
the script itself never installs system packages): otherwise these tests FAIL with its message."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from local_servers import POSTGRES_SERVER as SERVER
from local_servers import REPO, command_lines, free_port, load_postgres_script, postgres_cluster
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

TINY = ["--smoke-test", "--trials", "1", "--steps", "8", "--train-size", "100", "--per-class", "3", "--quiet"]


def processes_whose_command_line_has(text: str) -> list[str]:
    return [b" ".join(args).decode(errors="replace")[:200] for _pid, args in command_lines()
            if any(text.encode() in a for a in args)]


@pytest.fixture
def cluster():
    """A bare cluster (no MLflow) in a temp folder the postgres user can reach when run as root."""
    with postgres_cluster("tldr-pgtest-") as (m, c):
        yield m, c


@pytest.mark.slow
def test_no_connection_without_the_password_and_owner_is_not_superuser(cluster, tmp_path):
    import psycopg2

    m, c = cluster
    for extra in ({}, {"password": "not-the-password"}):  # over TCP
        with pytest.raises(psycopg2.OperationalError, match="no password supplied|password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=c.port, user=m.OWNER, dbname=m.DB, connect_timeout=10, **extra)
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):  # over the socket
        psycopg2.connect(host=str(c.sock_dir), port=c.port, user=m.ADMIN, dbname="postgres", connect_timeout=10)
    hba = (c.data_dir / "pg_hba.conf").read_text()
    rules = [ln.split() for ln in hba.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert rules and {r[-1] for r in rules} == {"scram-sha-256"}, rules  # no trust, no md5/password

    creds = json.loads(c.credentials_file.read_text())
    assert stat.S_IMODE(c.credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(c.sock_dir.stat().st_mode) == 0o700
    assert creds["owner_password"] != creds["admin_password"] and len(creds["owner_password"]) >= 32

    owner = psycopg2.connect(host="127.0.0.1", port=c.port, user=m.OWNER, password=creds["owner_password"],
                             dbname=m.DB, connect_timeout=10)
    owner.autocommit = True
    target = tmp_path / "written-by-postgres"
    with owner.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False, False)
        cur.execute("SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (m.DB,))
        assert cur.fetchone() == (m.OWNER,)  # owns its database: MLflow can migrate the schema
        cur.execute("CREATE TABLE t (x int)")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="pg_execute_server_program"):
            cur.execute(f"COPY (SELECT 1) TO PROGRAM 'touch {target}'")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("SELECT pg_read_file('pg_hba.conf')")
    owner.close()
    assert not target.exists()

    admin = psycopg2.connect(host="127.0.0.1", port=c.port, user=m.ADMIN, password=creds["admin_password"],
                             dbname="postgres", connect_timeout=10)
    with admin.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
    admin.close()


@pytest.mark.slow
def test_kept_cluster_reuses_its_passwords_and_refuses_a_readable_credentials_file(cluster):
    import psycopg2

    m, c = cluster
    before = json.loads(c.credentials_file.read_text())
    c.stop()
    os.chmod(c.credentials_file, 0o644)
    again = m.Cluster(c.bindir, c.data_dir, c.port)
    with pytest.raises(m.SetupError, match="readable by other users"):
        again.start()
    again.stop()
    os.chmod(c.credentials_file, 0o600)
    c2 = m.Cluster(c.bindir, c.data_dir, c.port)
    c2.start()
    try:
        assert c2.creds == before
        psycopg2.connect(c2.owner_uri().replace("+psycopg2", ""), connect_timeout=10).close()
    finally:
        c2.stop()


def test_missing_postgresql_is_one_error_and_nothing_is_installed(monkeypatch, tmp_path, capsys):
    m = load_postgres_script()
    calls: list = []
    monkeypatch.setattr(m.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(m.shutil, "which", lambda name: None)
    monkeypatch.setattr(m.subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail(f"ran {a}"))
    monkeypatch.setattr(m.subprocess, "Popen", lambda *a, **k: calls.append(a) or pytest.fail(f"started {a}"))
    assert m.main(["--data-dir", str(tmp_path / "pg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: PostgreSQL is not installed"), err
    assert "apt-get install -y postgresql" in err[0]  # what to run, not run
    assert calls == [] and not (tmp_path / "pg").exists()


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
    (ready_line,) = [ln for ln in log if ln.startswith("PostgreSQL ready:")]
    data, creds_file = re.search(r"\(data (.+); passwords in (.+)\)", ready_line).groups()
    assert ":***@" in ready_line  # the password is never printed
    yield f"http://127.0.0.1:{port}", tmp_path, json.loads(Path(creds_file).read_text())
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, "".join(log[-20:])
    assert not Path(data, "postmaster.pid").exists(), "PostgreSQL was not stopped"
    assert not Path(data).exists()  # the temp cluster is removed


@pytest.mark.slow
def test_smoke_search_against_postgres_backed_server(pg_server):
    from mlflow import MlflowClient

    uri, tmp_path, creds = pg_server
    # the owner's password is in no process's command line (the server got it through its environment)
    assert processes_whose_command_line_has(creds["owner_password"]) == []
    env = {**os.environ, "TLDR_RUNS": str(tmp_path / "runs"), "TLDR_CACHE": str(tmp_path / "cache"),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = run_python([REPO / "tune" / "search.py", "--tracking-uri", uri, *TINY], cwd=REPO, env=env, timeout=600)
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
    # the re-audit sees the one classifier version the search registered there (audited by it or not)
    out = run_python([REPO / "tune" / "reaudit.py", "--tracking-uri", uri, "--dry-run"], cwd=REPO, env=env, timeout=300)
    counts = re.search(r"(\d+) version\(s\) to audit, (\d+) up to date", out.stdout)
    assert out.returncode == 0 and counts and sum(map(int, counts.groups())) == 1, out.stdout + out.stderr
