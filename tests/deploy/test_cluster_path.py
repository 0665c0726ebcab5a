"""The cluster path of k8s/, as far as one machine allows (issue 13 #4): a local Ray head started
with the dashboard and its Jobs API (`ray start --head`, the Ray of the image's `cluster` extra)
and Ray's token authentication on, as the manifests run it; the RayJob's exact entrypoint and the
re-audit CronJob's exact entrypoint, read from the rendered k8s/base manifests, submitted through
the Jobs API with `ray job submit` (what KubeRay's submitter and the CronJob run); the search's
result read back from MLflow.

Documented substitutions, the only changes to the manifests' command lines:
- data and size: --dataset digits-8x8 (scikit-learn's, no download), --trials 1, --gpus-per-trial 0,
  --max-concurrent 1, plus --smoke-test --steps 8 --train-size 100 --per-class 3;
- where things go: --storage, --data-root and --tracking-uri (sqlite) under the test's folder;
- `ray job submit --working-dir <repo>` (the image has the code in /app instead).

The regression test registers two versions of one lineage (tests/registry_versions.py: a clean and a
leaky MLP on mnist-bundled) in a store of its own and submits the CronJob's entrypoint with its
--tracking-uri and --data-root substituted and --smoke-test --steps 4 --per-class 2 --kkt off
--membership-refs 0 added (the regression is on the membership axis):
the job must fail (the re-audit exits 3 on the regression, --fail-on-regression is in the manifest).

The head runs in its own process group and is stopped by that group and by its temp folder, not by
`ray stop` (which stops every Ray on the machine, other people's included)."""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from local_servers import command_lines, free_ports, stop_process_group, wait_until_answers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402

pytestmark = pytest.mark.slow
SHRINK = ["--smoke-test", "--steps", "8", "--train-size", "100", "--per-class", "3"]


def substitute(tokens: list[str], values: dict[str, str], extra: list[str]) -> list[str]:
    """`tokens` with the value after each flag of `values` replaced (every such flag must be there)."""
    out, seen = list(tokens), set()
    for i, tok in enumerate(out[:-1]):
        if tok in values:
            out[i + 1] = values[tok]
            seen.add(tok)
    missing = set(values) - seen
    assert not missing, f"the manifest's command line lacks {sorted(missing)}: {shlex.join(tokens)}"
    return out + extra


def stop_head(proc: subprocess.Popen, temp: Path) -> None:
    """Stop the head's process group, then anything else still running from its temp folder."""
    # the head, once it has run jobs, did not exit within 30 s of SIGTERM (a 31 s teardown): 10 s, then KILL
    stop_process_group(proc, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)))
    for pid, args in command_lines():
        if any(str(temp).encode() in a for a in args):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(dashboard URL, env with the token, work folder) of a local Ray head like the manifests' heads."""
    work = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="tldr-rh-", dir="/tmp"))  # short: Ray's socket paths are limited
    token = secrets.token_hex(32)
    gcs, dash, client, agent = free_ports(4)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "TLDR_RUNS": str(work / "runs"),
           "TLDR_CACHE": str(work / "cache"), "TLDR_DATA_ROOT": str(work / "data"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "500", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(work / "head.log", "w+")
    proc = subprocess.Popen(["ray", "start", "--head", "--block", "--include-dashboard=true", "--dashboard-host",
                             "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port",
                             str(client), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "1",
                             "--temp-dir", str(temp), "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    jobs = {"url": f"{url}/api/jobs/", "headers": {"Authorization": f"Bearer {token}"}, "timeout": 10}
    try:
        wait_until_answers(proc, lambda: requests.get(**jobs).status_code == 200,
                           "ray start --head (the Jobs API)", 600, log, every=2)
        yield url, env, work
    finally:
        stop_head(proc, temp)
        log.close()


def submit(url: str, env: dict, entrypoint: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", "submit", "--address", url, "--working-dir", str(kc.REPO), "--",
                           *entrypoint], env=env, capture_output=True, text=True, timeout=timeout)


def base_objects() -> list[dict]:
    try:
        kc.find_kubectl()
    except kc.SetupError as e:
        pytest.fail(str(e), pytrace=False)
    return kc.render(kc.K8S_DIR / "base")


def test_a_submission_without_the_token_is_refused(head, tmp_path):
    url, env, _work = head
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"RAY_AUTH_MODE": "disabled",
                                                                          "HOME": str(tmp_path)}
    out = subprocess.run(["ray", "job", "submit", "--address", url, "--", "python", "-c", "print('ran')"],
                         env=anonymous, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ran" not in out.stdout
    assert "Unauthorized" in out.stdout + out.stderr or "token" in (out.stdout + out.stderr).lower()


def test_rayjob_entrypoint_runs_through_the_jobs_api(head):
    from tldr_core.platform.tracking import store as tr

    url, env, work = head
    (job,) = [o for o in base_objects() if o["kind"] == "RayJob"]
    db = work / "mlflow.db"
    entry = substitute(shlex.split(job["spec"]["entrypoint"]),
                       {"--dataset": "digits-8x8", "--trials": "1", "--gpus-per-trial": "0", "--max-concurrent": "1",
                        "--storage": str(work / "tune"), "--tracking-uri": f"sqlite:///{db}",
                        "--data-root": str(work / "data")}, SHRINK)
    assert entry[:2] == ["python", "tune/search.py"] and "--address" in entry and "auto" in entry
    out = submit(url, env, entry)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout + out.stderr
    c = tr.client(f"sqlite:///{db}")
    experiment = c.get_experiment_by_name(entry[entry.index("--experiment") + 1])  # the manifest's experiment
    (search,) = c.search_runs([experiment.experiment_id], f"tags.`{tr.ROLE}` = 'search'")
    assert search.info.status == "FINISHED"
    trials = c.search_runs([experiment.experiment_id], f"tags.`tldr.search_run` = '{search.info.run_id}'")
    assert len(trials) == 1 and trials[0].info.status == "FINISHED", [t.info.status for t in trials]


def _cron_entrypoint(db: Path, work: Path, extra: list[str]) -> list[str]:
    (cron,) = [o for o in base_objects() if o["kind"] == "CronJob"]
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    return substitute(args[args.index("--") + 1:], {"--tracking-uri": f"sqlite:///{db}", "--data-root": str(work / "data")},
                      extra)


def test_reaudit_cronjob_entrypoint_runs_through_the_jobs_api(head):
    """After the search above registered its classifier, the CronJob's re-audit, submitted the same way,
    joins the cluster (--address auto) and finds that classifier version in MLflow."""
    url, env, work = head
    entry = _cron_entrypoint(work / "mlflow.db", work, ["--smoke-test", "--trials", "1", "--steps", "8", "--per-class", "3"])
    assert entry[:2] == ["python", "tune/reaudit.py"]
    out = submit(url, env, entry)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "re-audit of tldr-classifier-*" in out.stdout and "(max age 30 days)" in out.stdout, out.stdout[-3000:]


def test_reaudit_cronjob_fails_on_a_regression(head):
    """Two versions, the second far leakier: the CronJob's entrypoint, submitted as the CronJob submits it,
    ends the Ray job FAILED (so the CronJob's pod exits non-zero), naming the regressed version."""
    import registry_versions as rv

    url, env, work = head
    db = work / "gate" / "mlflow.db"
    db.parent.mkdir()
    versions = rv.register_versions(f"sqlite:///{db}", work / "gate", n=2)
    entry = _cron_entrypoint(db, work, ["--smoke-test", "--steps", "4", "--per-class", "2", "--kkt", "off",
                                        "--membership-refs", "0"])
    assert "--fail-on-regression" in entry  # the manifest's gate, not added here
    out = submit(url, env, entry)
    logs = out.stdout + out.stderr
    assert out.returncode != 0, logs[-4000:]
    assert f"gate: models:/{rv.NAME}/{versions[1]} regressed against models:/{rv.NAME}/{versions[0]}" in logs, logs[-4000:]
    assert "2 done, 0 model(s) that do not load, 0 failed" in logs
