"""The MLflow container of k8s/base/mlflow.yaml, run here as its pod would run it (issue 13 #3,
issue 14 #4): its exact command line and environment, with a read-only root file system except its
/tmp volume, against a real PostgreSQL (mlflow/postgres_server.py's private cluster standing in for
the Secret tldr-postgres's database). It must start, answer /health, refuse requests without
credentials, let the admin and the client account (Secrets tldr-mlflow-auth, tldr-mlflow-client)
in, keep the client account out of admin work, and show no password on any command line.

Substitutions (the only differences from the manifest): --host 127.0.0.1 (not every interface of
this machine) and a free --port; MLFLOW_ARTIFACTS_DESTINATION a folder on the /tmp volume instead of
S3; PATH starts with this venv's bin (the image has mlflow and python on its PATH)."""
from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from local_servers import free_port, postgres_cluster, stop_process_group, wait_until_answers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pod_sandbox as sb  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    with postgres_cluster("tldr-k8s-pg-") as (_script, cluster):
        yield cluster


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    objs = sb.render_base_or_fail()
    (deploy,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    creds = {"tldr-postgres": {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(postgres.port),
                               "POSTGRES_DB": "mlflow", "POSTGRES_USER": "tldr",
                               "POSTGRES_PASSWORD": postgres.creds["owner_password"]},
             "tldr-s3": {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)},
             "tldr-mlflow-auth": {"MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_hex(16),
                                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)},
             "tldr-mlflow-client": {"MLFLOW_TRACKING_USERNAME": "tldr-client",
                                    "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16)}}
    env = sb.container_env(objs, deploy, c, creds, {"metadata.namespace": "tldr"})
    env |= {"MLFLOW_ARTIFACTS_DESTINATION": "/tmp/mlartifacts",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port = free_port()
    argv = [a for a in sb.command_line(c, env) if not a.startswith(("--host=", "--port="))]
    argv += ["--host=127.0.0.1", f"--port={port}"]
    volume = tmp_path_factory.mktemp("mlflow-tmp")
    assert sb.writable_mounts(c) == ["/tmp"]
    log = open(volume.parent / "mlflow.log", "w+")
    proc = subprocess.Popen(sb.sandboxed(argv, {"/tmp": volume}), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, lambda: requests.get(f"{url}/health", timeout=5).status_code == 200,
                           "the manifest's MLflow command (/health)", 300, log)
        yield url, creds, volume, proc, log
    finally:
        stop_process_group(proc)
        log.close()


def _get(url: str, path: str, auth=None) -> requests.Response:
    return requests.get(f"{url}{path}", auth=auth, timeout=30)


def test_mlflow_refuses_requests_without_credentials(server):
    url, creds, *_ = server
    search = "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(url, search).status_code == 401
    assert _get(url, search, ("admin", "wrong")).status_code == 401
    admin = ("admin", creds["tldr-mlflow-auth"]["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert _get(url, search, admin).status_code == 200


def test_client_account_logs_runs_but_is_no_admin(server, monkeypatch):
    from mlflow import MlflowClient

    url, creds, *_ = server
    client = creds["tldr-mlflow-client"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", client["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", client["MLFLOW_TRACKING_PASSWORD"])
    c = MlflowClient(url)
    exp = c.create_experiment(f"k8s-manifest-{secrets.token_hex(4)}")
    run = c.create_run(exp)
    c.log_metric(run.info.run_id, "eval/quality", 0.25, step=3)
    assert c.get_run(run.info.run_id).data.metrics == {"eval/quality": 0.25}
    auth = (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"])
    made = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": "eve", "password": "x" * 16},
                         auth=auth, timeout=30)
    assert made.status_code == 403, made.text  # only the admin manages accounts


def test_no_password_on_any_command_line_and_config_is_private(server):
    url, creds, volume, proc, _log = server
    assert proc.poll() is None
    values = [creds["tldr-postgres"]["POSTGRES_PASSWORD"], creds["tldr-mlflow-auth"]["MLFLOW_AUTH_ADMIN_PASSWORD"],
              creds["tldr-mlflow-client"]["MLFLOW_TRACKING_PASSWORD"]]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert not any(v in text for v in values), f"a password on a command line: {text[:200]}"
    ini = volume / "mlflow" / "basic_auth.ini"
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and stat.S_IMODE(ini.parent.stat().st_mode) == 0o700
    assert creds["tldr-postgres"]["POSTGRES_PASSWORD"] in ini.read_text()  # the auth database's URI
