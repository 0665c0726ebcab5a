"""The audit under a read-only root file system, with the writable paths the k8s/ manifests configure
(issue 13 #4): the environment of the search's Ray head container (the image's ENV, then the
ConfigMaps and env of k8s/base/rayjob-search.yaml) and only its volumes writable (/tmp, /runs,
/data, /dev/shm), the working directory read-only like the pod's /app. The audit must finish,
write its output and its classifier cache into the volumes, and leave the working directory as
it was; without the manifests' TLDR_RUNS / TLDR_CACHE (the issue-13 defaults) it must fail instead,
which shows the sandbox really is read-only.

Substitutions: the programs are this venv's (PATH starts with its bin); MLFLOW_TRACKING_URI is
dropped (no MLflow server here; the audit logs to MLflow only when given one); the Secrets get
stand-in values."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402
import pod_sandbox as sb  # noqa: E402

pytestmark = pytest.mark.slow
AUDIT = ["python", "-m", "tldr_core.cli.audit", "--dataset", "digits-8x8", "--train-size", "100",
         "--classifier-epochs", "1", "--steps", "3", "--per-class", "2", "--batch-size", "8", "--device", "cpu",
         "--membership-refs", "2"]  # LiRA's reference models on Ray inside the sandbox too, the fewest it takes


def image_env() -> dict[str, str]:
    """The ENV of the project's Dockerfile (what the container starts with before the pod's env)."""
    text = (kc.REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


@pytest.fixture(scope="module")
def head():
    """(env, writable mount paths) of the search's Ray head container, rendered from k8s/base."""
    objs = sb.render_base_or_fail()
    (job,) = [o for o in objs if o["kind"] == "RayJob"]
    c = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    stand_in = {name: {k: f"stand-in-{k.lower()}" for k in keys} for name, keys in kc.USER_SECRETS.items()}
    env = {**image_env(), **sb.container_env(objs, job, c, stand_in, {"metadata.namespace": "tldr"})}
    env.pop("MLFLOW_TRACKING_URI")
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}
    return env, sb.writable_mounts(c)


def run_sandboxed(env: dict[str, str], mounts: list[str], root: Path) -> subprocess.CompletedProcess:
    volumes = {m: root / m.strip("/").replace("/", "_") for m in mounts}
    cmd = sb.sandboxed(AUDIT, volumes, cwd=str(kc.REPO))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_audit_writes_only_into_the_configured_volumes(head, tmp_path):
    env, mounts = head
    assert set(mounts) == {"/tmp", "/runs", "/data", "/dev/shm"}
    assert (env["TLDR_RUNS"], env["TLDR_CACHE"], env["HOME"], env["TMPDIR"]) == ("/runs", "/runs/cache", "/tmp", "/tmp")
    before = sb.snapshot(kc.REPO)
    out = run_sandboxed(env, mounts, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    metrics = json.loads((runs / "audit" / "metrics.json").read_text())  # the default --out, under TLDR_RUNS
    assert metrics["risk"] in ("LOW", "MEDIUM", "HIGH") and 0 <= metrics["metrics"]["quality"] <= 1
    # the classifier and the 2 reference models, cached in TLDR_CACHE
    assert len(list((runs / "cache" / "classifiers").glob("*.pt"))) == 3
    assert metrics["membership"]["reference_models"] == 2
    after = sb.snapshot(kc.REPO)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    # other people may edit the working tree meanwhile: what this audit would write is what matters
    assert not [k for k in changed if re.match(r"(runs|mlruns|\.cache|tmp)/", k) or k.endswith(".pyc")], changed


def test_without_the_manifests_paths_the_audit_cannot_write(head, tmp_path):
    """Control: TLDR_RUNS/TLDR_CACHE unset, so the defaults (./runs under the read-only working
    directory) apply: the audit must fail, not find somewhere else to write."""
    env, mounts = head
    env = {k: v for k, v in env.items() if k not in ("TLDR_RUNS", "TLDR_CACHE")}
    out = run_sandboxed(env, mounts, tmp_path)
    assert out.returncode != 0
    assert "Read-only file system" in out.stderr or "read-only" in out.stderr.lower(), out.stderr[-2000:]
    assert not any((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else True
