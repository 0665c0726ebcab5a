"""The hardening rules of tests/deploy/k8s_hardening.py (issue 13 #3, issue 14 #4) on the rendered
overlays: each real overlay passes them (test_k8s.py), and here each rule is shown to catch the
defect it is for, by breaking one thing in a copy of the rendered cpu-dev overlay (the richer one:
it has PostgreSQL, MinIO and the bucket Job besides MLflow and the two Ray clusters)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402
import k8s_hardening as kh  # noqa: E402


@pytest.fixture(scope="module")
def cpu_dev():
    try:
        kc.find_kubectl()
    except kc.SetupError as e:
        pytest.fail(str(e), pytrace=False)
    return kc.render_overlay("cpu-dev")


def obj(objs, kind, name):
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def ctr(o, name):
    (found,) = [c for _p, c, _pod in kc.containers(o) if c["name"] == name]
    return found


def env_of(c):
    return {e["name"]: e for e in c["env"]}


def _rayjob_cluster(objs):
    return obj(objs, "RayJob", "tldr-search")["spec"]["rayClusterSpec"]


def _worker(objs, kind="RayJob", name="tldr-search"):
    spec = obj(objs, kind, name)["spec"]
    spec = spec.get("rayClusterSpec", spec)
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def writable_mlflow_root(objs):
    ctr(obj(objs, "Deployment", "mlflow"), "mlflow")["securityContext"].pop("readOnlyRootFilesystem")


def writable_autoscaler_root(objs):
    _rayjob_cluster(objs)["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] = False


def worker_without_tmp(objs):
    w = _worker(objs)
    w["volumeMounts"] = [m for m in w["volumeMounts"] if m["mountPath"] != "/tmp"]


def runs_under_app(objs):
    obj(objs, "ConfigMap", "tldr-paths")["data"]["TLDR_RUNS"] = "/app/runs"  # the bug of issue 13


def read_only_runs_mount(objs):
    for m in _worker(objs, "RayCluster", "tldr-reaudit")["volumeMounts"]:
        if m["mountPath"] == "/runs":
            m["readOnly"] = True


def submitter_without_home(objs):
    sub = obj(objs, "RayJob", "tldr-search")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    sub["env"] = [e for e in sub["env"] if e["name"] != "HOME"]


def ray_node_without_runs_setting(objs):
    w = _worker(objs, "RayCluster", "tldr-reaudit")
    w["envFrom"] = [r for r in w["envFrom"] if r["configMapRef"]["name"] != "tldr-paths"]


def auth_disabled_on_a_worker(objs):
    env_of(_worker(objs, "RayCluster", "tldr-reaudit"))["RAY_AUTH_MODE"]["value"] = "disabled"


def no_auth_options(objs):
    del _rayjob_cluster(objs)["authOptions"]


def cronjob_without_token(objs):
    c = ctr(obj(objs, "CronJob", "tldr-reaudit"), "reaudit")
    c["env"] = [e for e in c["env"] if e["name"] != "RAY_AUTH_TOKEN"]


def token_as_plain_value(objs):
    sub = obj(objs, "RayJob", "tldr-search")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env_of(sub)["RAY_AUTH_TOKEN"].pop("valueFrom")
    env_of(sub)["RAY_AUTH_TOKEN"]["value"] = "$(SOME_TOKEN)"


def password_in_args(objs):
    """The MLflow container as shipped before issue 14: the URI with the password in its args."""
    ctr(obj(objs, "Deployment", "mlflow"), "mlflow")["args"].append(
        "--backend-store-uri=postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@$(POSTGRES_HOST)/$(POSTGRES_DB)")


def no_default_deny(objs):
    objs.remove(obj(objs, "NetworkPolicy", "default-deny"))


def ingress_only_default_deny(objs):
    obj(objs, "NetworkPolicy", "default-deny")["spec"]["policyTypes"] = ["Ingress"]


MUTATIONS: list[tuple[Callable, set[str]]] = [
    (writable_mlflow_root, {"read-only-root"}),
    (writable_autoscaler_root, {"read-only-root"}),
    (worker_without_tmp, {"writable-path"}),
    (runs_under_app, {"writable-path"}),
    (read_only_runs_mount, {"writable-path"}),
    (submitter_without_home, {"writable-path"}),
    (ray_node_without_runs_setting, {"writable-path"}),
    (auth_disabled_on_a_worker, {"ray-auth"}),
    (no_auth_options, {"ray-auth"}),
    (cronjob_without_token, {"ray-auth"}),
    (token_as_plain_value, {"ray-auth", "plaintext-secret", "env-ref"}),
    (password_in_args, {"secret-in-args"}),
    (no_default_deny, {"network-policy"}),
    (ingress_only_default_deny, {"network-policy"}),
]


def non_schema_findings(objs):
    """Every check but the (slow, already run on the real overlays) schema validation."""
    out = [f for o in objs for check in kc.PER_OBJECT_CHECKS if check is not kc.check_schema for f in check(o)]
    return out + kc.check_selectors(objs) + kc.check_references(objs) + kh.run_hardening_checks(objs)


def test_the_real_overlay_is_clean(cpu_dev):
    assert non_schema_findings(cpu_dev) == []


@pytest.mark.parametrize("mutate,expected", MUTATIONS, ids=[m.__name__ for m, _e in MUTATIONS])
def test_each_rule_catches_its_defect(cpu_dev, mutate, expected):
    objs = copy.deepcopy(cpu_dev)
    mutate(objs)
    findings = non_schema_findings(objs)
    assert {f.check for f in findings} == expected, "\n".join(map(str, findings)) or "no findings"


def test_own_image_names():
    assert kh.own_image("tldr") and kh.own_image("ghcr.io/x/tldr:0.1.0") and kh.own_image("r.io/tldr-mlflow@sha256:ab")
    assert not kh.own_image("postgres:17.6") and not kh.own_image("quay.io/minio/minio:RELEASE.x")


def test_resolved_env_expands_like_the_kubelet(cpu_dev):
    """envFrom ConfigMaps, then env in order, `$(VAR)` from earlier definitions; Secrets unknown (None)."""
    mlflow = obj(cpu_dev, "Deployment", "mlflow")
    env = kh.resolved_env(cpu_dev, mlflow, ctr(mlflow, "mlflow"))
    assert env["HOME"] == "/tmp" and env["POSTGRES_PASSWORD"] is None and env["POD_NAMESPACE"] is None
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"].startswith("mlflow.$(POD_NAMESPACE).svc")  # downward API: not known
    cron = obj(cpu_dev, "CronJob", "tldr-reaudit")
    assert kh.resolved_env(cpu_dev, cron, ctr(cron, "reaudit"))["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
