"""MLflow helpers (tldr_core.platform.tracking): tracking URIs, the fail-fast check, the TCP probe,
and logging a report beside a run."""
from __future__ import annotations

import socket

import pytest

from tldr_core.platform import tracking as tr
from tldr_core.platform.probe import tcp_reachable


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
