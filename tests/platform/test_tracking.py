"""MLflow helpers (tldr_core.platform.tracking.store): tracking URIs, the fail-fast check, the TCP probe,
and logging a report beside a run."""
from __future__ import annotations

import socket

import pytest

from blank_store import without_blank_store
from local_servers import free_port
from tldr_core.platform.probe import tcp_reachable
from tldr_core.platform.tracking import store as tr


def test_tracking_uris_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TLDR_RUNS", raising=False)
    assert tr.normalize_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert tr.normalize_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    assert tr.normalize_tracking_uri("store") == f"file://{tmp_path.resolve() / 'store'}"
    assert tr.normalize_tracking_uri("http://h:5000") == "http://h:5000"
    assert tr.is_local_store("sqlite:////a.db") and not tr.is_local_store("http://h:5000")


def test_check_tracking_uri_fails_fast(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tr.TrackingError, match="unreachable"):
        tr.check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2)
    tr.check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'm.db'}")  # creates the folder, not the database
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "m.db").exists()
    assert tcp_reachable("127.0.0.1", port, timeout=2).startswith("ConnectionRefusedError")


@pytest.mark.slow
def test_log_report_to_mlflow_puts_it_beside_the_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run = c.create_run(exp)
    html = tmp_path / "report.html"
    html.write_text("<!DOCTYPE html><html><body>ok</body></html>")
    tr.log_report_to_mlflow(html, run.info.run_id, tracking_uri=uri)
    tr.log_report_to_mlflow(html, run.info.run_id, artifact_path="reports", client=c)
    assert sorted(a.path for a in c.list_artifacts(run.info.run_id)) == ["report.html", "reports"]
    assert [a.path for a in c.list_artifacts(run.info.run_id, "reports")] == ["reports/report.html"]


# ------------------------------------------------------------------------------------ credentials (issue 14 #3)

@pytest.mark.parametrize("text, expected", [
    ("postgresql://mlflow:pa55@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("error: http://bob:s3cr%40t@h:5000 is unreachable (ConnectionError: http://bob:s3cr%40t@h:5000/health)",
     "error: http://bob:***@h:5000 is unreachable (ConnectionError: http://bob:***@h:5000/health)"),
    ("postgresql+psycopg2://u:p@h/db?sslmode=require&password=x2", "postgresql+psycopg2://u:***@h/db?sslmode=require&password=***"),
    ("s3://bucket/prefix?token=abc&x=1", "s3://bucket/prefix?token=***&x=1"),
    ("http://user@h:5000", "http://user@h:5000"),  # no password: unchanged
    ("sqlite:////runs/mlflow.db", "sqlite:////runs/mlflow.db"),
])
def test_redact_masks_every_password(text, expected):
    assert tr.redact(text) == expected


@pytest.mark.slow
def test_params_and_tags_never_store_a_password(tmp_path):
    c = tr.client(f"sqlite:///{tmp_path / 'm.db'}")
    run = c.create_run(tr.ensure_experiment(c, "t", tmp_path / "art"))
    secret = "postgresql://mlflow:pa55w0rd@db/mlflow"
    tr.log_params(c, run.info.run_id, {"tracking_uri": secret})
    tr.set_tags(c, run.info.run_id, {"tldr.error": f"cannot reach {secret}"})
    data = c.get_run(run.info.run_id).data
    assert data.params["tracking_uri"] == "postgresql://mlflow:***@db/mlflow"
    assert "pa55w0rd" not in data.tags["tldr.error"]


def test_check_tracking_uri_error_carries_no_password():
    with pytest.raises(tr.TrackingError) as err:
        tr.check_tracking_uri(f"http://bob:pa55w0rd@127.0.0.1:{free_port()}", timeout=2)
    assert "pa55w0rd" not in str(err.value) and "bob:***@127.0.0.1" in str(err.value)


# ------------------------------------------------------------------------------------ a fresh sqlite store (issue 14 #6)

_CREATE = """
import sys, time
from tldr_core.platform.tracking import store as tr
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens the fresh database at the same moment
c = tr.client(uri)
tr.ensure_experiment(c, "race")
print(c.search_experiments(max_results=5)[0].name)
"""


@pytest.mark.slow
def test_processes_creating_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    start = time.time() + 8  # after every interpreter has imported MLflow
    env = without_blank_store()  # MLflow's own schema creation, racing (not the session's blank copy)
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE, uri, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-600:] for _o, e in outs]
    c = tr.client(uri)  # the schema is complete: a later client works
    assert [e.name for e in c.search_experiments()] == ["race", "Default"] or \
        sorted(e.name for e in c.search_experiments()) == ["Default", "race"]
    assert (tmp_path / "fresh" / "mlflow.db.lock").exists()


# ------------------------------------------------------------------------------------ names and models

def test_metric_names_group_and_sort_the_objective_first():
    names = {**tr.metric_names("eval", {"quality": 1, "coverage": 0}), **tr.loss_names(
        {"step": 3, "loss": 2.0, "loss_ce": 1.0, "wloss_kl_pert": 0.5, "seconds": 9.0}),
        tr.objective_name("quality"): 1, "train/seconds": 9.0}
    assert sorted(names)[0] == "Objective/quality"
    assert {"loss/total", "loss/ce", "wloss/kl_pert", "eval/coverage"} <= set(names) and "loss/seconds" not in names
    assert tr.scores_of({"eval/quality": 0.3, "loss/ce": 1.0}) == {"quality": 0.3}


@pytest.mark.slow
def test_logged_models_land_in_their_runs_experiment(tmp_path, tiny_cnn):
    from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
    from tldr_core.platform.registry.models import log_checkpoint_model

    c = tr.client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = tr.ensure_experiment(c, "models", tmp_path / "art")
    path = save_checkpoint(tmp_path / "clf.pt", tiny_cnn, CLASSIFIER_FORMAT, {})
    idle = c.create_run(exp).info.run_id  # not MLflow's active run
    log_checkpoint_model(c, idle, path, "classifier")
    active = c.create_run(exp).info.run_id
    with tr.active_run(active):
        log_checkpoint_model(c, active, path, "classifier")
    assert c.get_run(active).info.status == "FINISHED" and c.get_run(idle).info.status == "RUNNING"
    models = list(c.search_logged_models([exp]))
    assert sorted(m.source_run_id for m in models) == sorted([idle, active])
    assert list(c.search_logged_models(["0"])) == [] and not (tmp_path / "mlruns").exists()
    for run_id in (idle, active):
        assert len(c.get_run(run_id).outputs.model_outputs) == 1  # the run page's Models column


@pytest.mark.slow
def test_a_store_copied_from_the_blank_file_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    """The session's shortcut (tests/blank_store.py) changes nothing a store holds: the same tables,
    indexes and schema revision, and the same Default experiment, as a store MLflow creates itself."""
    import sqlite3
    import subprocess
    import sys

    import blank_store

    def clauses(sql):  # MLflow's table rebuilds list CHECK constraints in no fixed order (run to run too)
        return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())

    def contents(db):
        with sqlite3.connect(db) as con:
            return ([(t, n, tbl, clauses(sql)) for t, n, tbl, sql in
                     con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")],
                    con.execute("SELECT * FROM alembic_version").fetchall(),
                    con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments")
                    .fetchall())

    monkeypatch.delenv(tr.BLANK_STORE_ENV, raising=False)
    made = tmp_path / "made" / "mlflow.db"
    tr.client(f"sqlite:///{made}")
    blank = tmp_path / "blank.db"
    subprocess.run([sys.executable, "-c", blank_store._MAKE, str(blank)], check=True, timeout=300, cwd=tmp_path)
    monkeypatch.setenv(tr.BLANK_STORE_ENV, str(blank))
    copied = tmp_path / "copied" / "mlflow.db"
    tr.client(f"sqlite:///{copied}")
    assert contents(blank)[2] == []  # schema only: the Default experiment is made by the store that copies it
    tables, revision, experiments = contents(copied)
    assert (tables, revision) == contents(made)[:2] and len(tables) > 20 and revision
    assert [e[1] for e in experiments] == ["Default"] and experiments == contents(made)[2]
