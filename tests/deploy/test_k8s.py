"""The Kubernetes manifests (k8s/), the Dockerfile and the checks that guard them.

Offline only: `kubectl kustomize` renders the overlays, kubernetes-validate and the
KubeRay CRD schemas validate them, tests/deploy/k8s_checks.py adds what the schemas cannot see
(k8s_hardening.py the security rules, tested in test_k8s_hardening.py), and
tests/deploy/fixtures/k8s/ proves each check can fail. The images are in test_container_images.py.
Missing tools, schemas or scripts make tests FAIL, not skip: they are declared deps.
"""
from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402
import k8s_hardening as kh  # noqa: E402

FIXTURES = sorted(p for p in kc.FIXTURES_DIR.glob("*.yaml") if p.name != "valid-minimal.yaml")
SEARCH_SCRIPT = "tune/search.py"
REAUDIT_SCRIPT = "tune/reaudit.py"


def _require(fn, *args):
    """Call a k8s_checks helper; a missing declared dependency fails the test with its message."""
    try:
        return fn(*args)
    except kc.SetupError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


def rendered(overlay: str) -> list[dict]:
    _require(kc.find_kubectl)
    return kc.render_overlay(overlay)


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(obj: dict, name: str) -> dict:
    found = [c for _p, c, _pod in kc.containers(obj) if c["name"] == name]
    assert len(found) == 1, f"{kc.where(obj)}: expected one container {name}"
    return found[0]


def arg_value(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag:
            return args[i + 1]
    raise AssertionError(f"{flag} not in {args}")


# --------------------------------------------------------------------------- tools

def test_kubectl_is_installed():
    path = _require(kc.find_kubectl)
    assert Path(path).is_file()


def test_kuberay_schemas_are_present():
    for kind in kc.KUBERAY_SCHEMA_FILES:
        schema = _require(kc.kuberay_schema, kind)
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec"}


# --------------------------------------------------------------------------- the real overlays

BASE_POLICIES = {"default-deny", "dns", "search-cluster", "search-dashboard", "search-submitter", "reaudit-cluster",
                 "reaudit-dashboard", "reaudit-submit", "mlflow"}
CPU_DEV_POLICIES = {"postgres", "minio", "mlflow-to-postgres", "minio-clients"}


def test_base_renders():
    _require(kc.find_kubectl)
    kinds = sorted(o["kind"] for o in kc.render(kc.K8S_DIR / "base"))
    assert kinds == sorted(["ConfigMap", "ConfigMap", "CronJob", "Deployment", "Namespace", "RayCluster", "RayJob",
                            "Service"] + ["NetworkPolicy"] * len(BASE_POLICIES))


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_renders_expected_objects(overlay):
    objs = rendered(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", "tldr"), ("ConfigMap", "tldr-settings"), ("ConfigMap", "tldr-paths"),
                ("Deployment", "mlflow"), ("Service", "mlflow"), ("RayJob", "tldr-search"),
                ("RayCluster", "tldr-reaudit"), ("CronJob", "tldr-reaudit")}
    policies = BASE_POLICIES
    if overlay == "cpu-dev":
        expected |= {("Deployment", "postgres"), ("Service", "postgres"), ("PersistentVolumeClaim", "postgres-data"),
                     ("ConfigMap", "postgres-init"), ("Deployment", "minio"), ("Service", "minio"),
                     ("PersistentVolumeClaim", "minio-data"), ("Job", "create-buckets")}
        policies = BASE_POLICIES | CPU_DEV_POLICIES
    assert names == expected | {("NetworkPolicy", n) for n in policies}
    assert not [o for o in objs if o["kind"] == "Secret"], "Secrets are created by hand (k8s/README.md)"
    # One namespace for everything, labels on everything, one image of each of ours per overlay.
    ns = one(objs, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {ns}
    assert all(o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "tldr" for o in objs)
    for repo in ("/tldr:", "/tldr-mlflow:"):
        images = {c["image"] for o in objs for _p, c, _pod in kc.containers(o) if repo in c["image"]}
        assert len(images) == 1, (repo, images)


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_passes_every_check(overlay):
    objs = rendered(overlay)
    _require(kc.kuberay_schema, "RayJob")
    findings = kc.run_all_checks(objs) + kh.run_hardening_checks(objs)
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_builtin_objects_also_valid_on_newest_bundled_kubernetes(overlay):
    """Strict validation against the newest schemas kubernetes-validate bundles, so a field
    removed since 1.31 is caught too."""
    import kubernetes_validate

    newest = kubernetes_validate.latest_version()
    builtin = [o for o in rendered(overlay) if o["kind"] not in kc.KUBERAY_SCHEMA_FILES]
    findings = [f for o in builtin for f in kc.validate_builtin(o, newest)]
    assert not findings, "\n".join(map(str, findings))


def test_gpu_overlay_workers_request_gpus():
    gpu = rendered("gpu")
    assert kc.check_gpu_workers(gpu) == []
    job = one(gpu, "RayJob")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    _s, flags = kc.parse_command(job["spec"]["entrypoint"])
    assert flags["--gpus-per-trial"] == "0.25" and flags["--trials"] == "200"
    # ...and the check does fail on an overlay without GPUs.
    assert {f.check for f in kc.check_gpu_workers(rendered("cpu-dev"))} == {"gpu"}


def test_cpu_dev_overlay_is_cpu_only():
    cpu = rendered("cpu-dev")
    assert kc.check_no_gpus(cpu) == []
    _s, flags = kc.parse_command(one(cpu, "RayJob")["spec"]["entrypoint"])
    assert flags["--gpus-per-trial"] == "0" and flags["--trials"] == "8"
    assert one(cpu, "ConfigMap", "tldr-settings")["data"]["AWS_ENDPOINT_URL"].startswith("http://minio.")
    assert kc.check_no_gpus(rendered("gpu")), "check_no_gpus must fail on the gpu overlay"


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_rayjob(overlay):
    objs = rendered(overlay)
    spec = one(objs, "RayJob")["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    _script, flags = kc.parse_command(spec["entrypoint"])
    assert spec["entrypoint"].startswith(f"python {SEARCH_SCRIPT} ")
    assert flags["--address"] == "auto" and flags["--storage"].startswith("s3://")
    assert flags["--data-root"] == "/data" and flags["--download"] is True


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_cluster_pods(overlay, kind):
    """The search's and the re-audit's clusters: autoscaling, no trials on the head, token auth, the
    settings, Secrets and volumes every Ray container needs, the data fetched before Ray starts."""
    objs = rendered(overlay)
    obj = one(objs, kind)
    ((_path, rcs),) = kc.raycluster_specs(obj)
    assert rcs["enableInTreeAutoscaling"] is True and rcs["authOptions"] == {"mode": "token",
                                                                          "secretName": "tldr-ray-token"}
    assert rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    settings = one(objs, "ConfigMap", "tldr-settings")["data"]
    assert "MLFLOW_TRACKING_URI" in settings
    for path, ray, pod in kh.ray_node_containers(obj):
        assert ray["workingDir"] == "/app", path
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in ray["env"], path
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in ray["env"] if "valueFrom" in e}
        assert secret_env == {"RAY_AUTH_TOKEN": "tldr-ray-token", "AWS_ACCESS_KEY_ID": "tldr-s3",
                              "AWS_SECRET_ACCESS_KEY": "tldr-s3", "MLFLOW_TRACKING_USERNAME": "tldr-mlflow-client",
                              "MLFLOW_TRACKING_PASSWORD": "tldr-mlflow-client"}, path
        assert [r["configMapRef"]["name"] for r in ray["envFrom"]] == ["tldr-settings", "tldr-paths"], path
        assert {m["mountPath"] for m in ray["volumeMounts"]} == {"/tmp", "/runs", "/data", "/dev/shm"}, path
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-data"], path


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_tracking_uri_reaches_mlflow(overlay):
    """Entrypoint, ConfigMap, Service and MLflow's allowed hosts all name the same server."""
    objs = rendered(overlay)
    _s, flags = kc.parse_command(one(objs, "RayJob")["spec"]["entrypoint"])
    uri = flags["--tracking-uri"]
    assert one(objs, "ConfigMap", "tldr-settings")["data"]["MLFLOW_TRACKING_URI"] == uri
    parts = urlsplit(uri)
    svc_name, ns, *rest = parts.hostname.split(".")
    assert rest == ["svc", "cluster", "local"], uri
    svc = one(objs, "Service", svc_name)
    assert svc["metadata"]["namespace"] == ns
    assert parts.port in [p["port"] for p in svc["spec"]["ports"]]
    c = container(one(objs, "Deployment", svc_name), "mlflow")
    env = {e["name"]: e.get("value") for e in c["env"]}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].replace("$(POD_NAMESPACE)", ns).split(",")
    for host in (parts.netloc, "localhost:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), (host, allowed)


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_mlflow_server(overlay):
    """Basic auth on, artifacts proxied to S3, and no credential on the command line: the entrypoint
    script builds the database URI from the environment (tests/deploy/test_mlflow_manifest.py runs it)."""
    objs = rendered(overlay)
    c = container(one(objs, "Deployment", "mlflow"), "mlflow")
    assert "/tldr-mlflow:" in c["image"]
    assert c["command"][:2] == ["/bin/sh", "-ec"] and c["command"][2].rstrip().endswith('exec mlflow server "$@"')
    assert c["args"][:1] == ["--app-name=basic-auth"] and "--serve-artifacts" in c["args"]
    assert not any("backend-store-uri" in a or "PASSWORD" in a for a in c["args"])
    assert "export MLFLOW_BACKEND_STORE_URI=" in c["command"][2]
    assert one(objs, "ConfigMap", "tldr-settings")["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    from_secrets = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secrets == (kc.USER_SECRETS["tldr-postgres"] | kc.USER_SECRETS["tldr-s3"]
                            | kc.USER_SECRETS["tldr-mlflow-auth"] | {"MLFLOW_CLIENT_USERNAME", "MLFLOW_CLIENT_PASSWORD"})
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_reaudit_cronjob(overlay):
    """The CronJob submits the re-audit to the long-lived RayCluster's Jobs API, with the data root the
    cluster's pods fill and the cluster's address for the search it runs."""
    objs = rendered(overlay)
    spec = one(objs, "CronJob", "tldr-reaudit")["spec"]
    assert kc.cron_problems(spec["schedule"]) == []
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    c = container(one(objs, "CronJob", "tldr-reaudit"), "reaudit")
    assert c["command"] == ["ray", "job", "submit"]
    submit, entrypoint = c["args"][:c["args"].index("--")], c["args"][c["args"].index("--") + 1:]
    head = urlsplit(arg_value(submit, "--address"))
    cluster = one(objs, "RayCluster", "tldr-reaudit")
    assert head.scheme == "http" and head.hostname == cluster["metadata"]["name"] + "-head-svc"
    head_ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]
                  ["containers"][0]["ports"]}
    assert head.port == head_ports["dashboard"] == 8265
    assert entrypoint[:2] == ["python", REAUDIT_SCRIPT]
    _s, flags = kc.parse_command(entrypoint)
    assert flags == {"--address": "auto", "--tracking-uri": "$(MLFLOW_TRACKING_URI)", "--data-root": "/data",
                     "--download": True, "--max-age-days": "30", "--fail-on-regression": True}
    assert all("/data" in {m["mountPath"] for m in ray["volumeMounts"]} for _p, ray, _pod in
               kh.ray_node_containers(cluster))


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_search_entrypoint_flags_exist(overlay):
    """Every flag the RayJob passes is one `python tune/search.py --help` lists."""
    script, flags = kc.parse_command(one(rendered(overlay), "RayJob")["spec"]["entrypoint"])
    assert script == SEARCH_SCRIPT
    known = _require(kc.script_help_flags, SEARCH_SCRIPT)
    assert set(flags) <= known, f"unknown to {SEARCH_SCRIPT}: {sorted(set(flags) - known)}"


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_reaudit_flags_exist(overlay):
    c = container(one(rendered(overlay), "CronJob", "tldr-reaudit"), "reaudit")
    script, flags = kc.parse_command(c["args"][c["args"].index("--") + 1:])
    assert script == REAUDIT_SCRIPT
    known = _require(kc.script_help_flags, REAUDIT_SCRIPT)
    assert set(flags) <= known, f"unknown to {REAUDIT_SCRIPT}: {sorted(set(flags) - known)}"


def test_readme_creates_exactly_the_referenced_secrets():
    text = (kc.K8S_DIR / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r'kubectl -n tldr create secret generic (\S+)((?: +--from-literal=\w+=(?:"[^"]*"|\S+))+)',
                          text)
    assert commands, "k8s/README.md has no `kubectl create secret generic` commands"
    for name, literals in commands:
        keys = set(re.findall(r"--from-literal=(\w+)=", literals))
        assert keys == kc.USER_SECRETS[name], (name, keys)
    assert {name for name, _l in commands} == set(kc.USER_SECRETS)


# --------------------------------------------------------------------------- broken fixtures

def test_valid_fixture_passes_every_check():
    _require(kc.kuberay_schema, "RayJob")
    findings = kc.run_all_checks(kc.load_manifest_file(kc.FIXTURES_DIR / "valid-minimal.yaml"))
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_broken_fixture_is_rejected(fixture):
    """Exactly the checks the fixture names (and no others) reject it."""
    _require(kc.kuberay_schema, "RayJob")
    expected = kc.fixture_expectation(fixture)
    findings = kc.run_all_checks(kc.load_manifest_file(fixture))
    assert {f.check for f in findings} == expected, "\n".join(map(str, findings)) or "no findings"


def test_fixtures_cover_the_required_defects():
    covered = set().union(*(kc.fixture_expectation(p) for p in FIXTURES))
    assert covered >= {"schema", "limits", "plaintext-secret", "cron", "submission-mode", "ttl", "replicas",
                       "ray-start-params", "restart-policy", "selector", "concurrency"}


# --------------------------------------------------------------------------- the checks themselves

def test_close_schema():
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"b": {}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
            # a field that happens to be called "properties" is a field, not a keyword
            "properties": {"type": "object", "properties": {"d": {}}},
        },
    }
    closed = kc.close_schema(schema)
    assert "additionalProperties" not in schema  # the input is not modified
    p = closed["properties"]
    assert closed["additionalProperties"] is False
    assert p["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in p["open"]
    assert p["map"]["additionalProperties"] == {"type": "string"}
    assert p["list"]["items"]["additionalProperties"] is False
    assert p["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in p["properties"]["properties"]


def test_closing_the_kuberay_schema_is_what_catches_unknown_fields():
    obj = kc.load_manifest_file(kc.FIXTURES_DIR / "rayjob-unknown-field.yaml")[0]
    assert _require(kc.validate_kuberay, obj, False) == []  # the CRD schema as shipped accepts it
    assert [f.check for f in kc.validate_kuberay(obj, True)] == ["schema"]


def test_the_reaudit_raycluster_is_validated_against_its_crd():
    """The RayCluster (new with the re-audit) goes through the same closed KubeRay schema as the RayJob."""
    cluster = one(rendered("gpu"), "RayCluster")
    assert _require(kc.validate_kuberay, cluster, True) == []
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # misspelt
    cluster["spec"]["authOptions"]["mode"] = "tokens"
    found = kc.check_schema(cluster)
    assert {f.check for f in found} == {"schema"} and len(found) == 2, "\n".join(map(str, found))


@pytest.mark.parametrize("expr", ["0 3 * * *", "*/15 * * * *", "0 0 1,15 * *", "0 9-17/2 * * MON-FRI",
                                  "30 4 ? JAN,jul sun", "0 0 * * 0-6", "5 4 1 12 *", "@daily", "@every 1h30m"])
def test_cron_validator_accepts(expr):
    assert kc.cron_problems(expr) == []


@pytest.mark.parametrize("expr", ["", "0 3 * *", "0 0 3 * * *", "60 * * * *", "0 24 * * *", "0 0 0 * *",
                                  "0 0 * 13 *", "0 0 * * 7", "0 0 * * FUN", "*/0 * * * *", "5-1 * * * *",
                                  "0,,5 * * * *", "? * * * *", "TZ=UTC 0 3 * * *", "@fortnightly", "a b c d e"])
def test_cron_validator_rejects(expr):
    assert kc.cron_problems(expr)
