"""mlflow/serve.py: a local MLflow server on loopback, reading a search's runs through the REST API."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from local_servers import REPO, free_port, stop_process_group, wait_until_answers
from tldr_core.attack.config import LossWeights
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import TrialRun
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

SERVE = REPO / "mlflow" / "serve.py"


def test_mlflow_folder_is_not_a_package():
    # an __init__.py there would shadow the real mlflow package for anything run from the repo root
    assert not (REPO / "mlflow" / "__init__.py").exists()
    assert (REPO / "mlflow" / "README.md").is_file()


def test_serve_binds_loopback_by_default(tmp_path):
    out = run_python([SERVE, "--db", tmp_path / "x.db", "--print-command"], cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{(tmp_path / 'x.db').resolve()}"


@pytest.mark.slow
def test_server_serves_the_search_runs_over_rest(tmp_path):
    # a search as tune/search.py records it: parent run, nested trial run, metrics over steps, an artifact
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tr.client(uri)
    exp = tr.ensure_experiment(c, "tldr-server-test", tmp_path / "mlartifacts")
    parent = c.create_run(exp, tags={tr.ROLE: "search", tr.OBJECTIVE: "quality"}, run_name="search-x").info.run_id
    trial = TrialRun.start(c, exp, parent, "abc", 1, "trial-001-label")
    trial.log_params({**LossWeights().as_dict(), "variant": "label"})
    for step, q in ((5, 0.1), (10, 0.2)):
        trial.log_metrics({"eval/quality": q, "eval/label_agreement": 1.0}, step)
    (tmp_path / "grid.png").write_bytes(b"\x89PNG fake")
    trial.log_artifact(tmp_path / "grid.png")
    trial.end("FINISHED", "finished")
    c.set_terminated(parent, "FINISHED")

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVE), "--db", str(tmp_path / "mlflow.db"), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "TLDR_RUNS": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, lambda: requests.get(f"{base}/health", timeout=2).status_code == 200,
                           "the MLflow server (/health)", 120)
        api = f"{base}/api/2.0/mlflow"
        r = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "tldr-server-test"}, timeout=30)
        assert r.status_code == 200 and r.json()["experiment"]["experiment_id"] == exp
        runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp], "max_results": 10},
                             timeout=30).json()["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == {"search-x", "trial-001-label"}
        t = by_name["trial-001-label"]
        tags = {x["key"]: x["value"] for x in t["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent and t["info"]["status"] == "FINISHED"
        params = {x["key"]: x["value"] for x in t["data"]["params"]}
        assert set(LossWeights.names()) | {"variant"} <= set(params)
        hist = requests.get(f"{api}/metrics/get-history",
                            params={"run_id": t["info"]["run_id"], "metric_key": "eval/quality"}, timeout=30).json()
        assert [(m["step"], m["value"]) for m in hist["metrics"]] == [(5, 0.1), (10, 0.2)]
        art = requests.get(f"{base}/get-artifact", params={"path": "grid.png", "run_uuid": t["info"]["run_id"]},
                           timeout=30)
        assert art.status_code == 200 and art.content == b"\x89PNG fake"
    finally:  # the server stops on SIGINT (it ignores SIGTERM for a while)
        stop_process_group(proc, ((signal.SIGINT, 20), (signal.SIGKILL, 10)))
