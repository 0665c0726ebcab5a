"""The Kubernetes manifests (k8s/), the Dockerfile and the checks that guard them.

Offline only: `kubectl kustomize` renders the overlays, kubernetes-validate and the
KubeRay CRD schemas (../shared/k8s-schemas) validate them, tests/deploy/k8s_checks.py adds what
the schemas cannot see, and tests/deploy/fixtures/k8s/ proves each check can fail.
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

def test_base_renders():
    _require(kc.find_kubectl)
    kinds = sorted(o["kind"] for o in kc.render(kc.K8S_DIR / "base"))
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "Namespace", "RayJob", "Service"]


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_renders_expected_objects(overlay):
    objs = rendered(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", "tldr"), ("ConfigMap", "tldr-settings"), ("Deployment", "mlflow"),
                ("Service", "mlflow"), ("RayJob", "tldr-search"), ("CronJob", "tldr-reaudit")}
    if overlay == "cpu-dev":
        expected |= {("Deployment", "postgres"), ("Service", "postgres"), ("PersistentVolumeClaim", "postgres-data"),
                     ("Deployment", "minio"), ("Service", "minio"), ("PersistentVolumeClaim", "minio-data"),
                     ("Job", "create-buckets")}
    assert names == expected
    assert not [o for o in objs if o["kind"] == "Secret"], "Secrets are created by hand (k8s/README.md)"
    # One namespace for everything, labels on everything, one project image per overlay.
    ns = one(objs, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {ns}
    assert all(o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "tldr" for o in objs)
    project_images = {c["image"] for o in objs for _p, c, _pod in kc.containers(o) if "/tldr:" in c["image"]}
    assert len(project_images) == 1, project_images


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_overlay_passes_every_check(overlay):
    objs = rendered(overlay)
    _require(kc.kuberay_schema, "RayJob")
    findings = kc.run_all_checks(objs)
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
    job = one(objs, "RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    rcs = spec["rayClusterSpec"]
    assert rcs["enableInTreeAutoscaling"] is True
    assert rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    script, flags = kc.parse_command(spec["entrypoint"])
    assert spec["entrypoint"].startswith(f"python {SEARCH_SCRIPT} ")
    assert flags["--address"] == "auto" and flags["--storage"].startswith("s3://")
    assert flags["--data-root"] == "/data" and flags["--download"] is True
    settings = one(objs, "ConfigMap", "tldr-settings")["data"]
    for path, tpl in kc.pod_templates(job):
        if path.endswith("submitterPodTemplate"):
            continue
        pod = tpl["spec"]
        ray = pod["containers"][0]
        assert ray["workingDir"] == "/app", path
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in ray["env"], path
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in ray["env"] if "valueFrom" in e}
        assert secret_env == {"AWS_ACCESS_KEY_ID": "tldr-s3", "AWS_SECRET_ACCESS_KEY": "tldr-s3"}, path
        assert {"configMapRef": {"name": "tldr-settings"}} in ray["envFrom"], path
        assert "MLFLOW_TRACKING_URI" in settings
        mounts = {m["mountPath"] for m in ray["volumeMounts"]}
        assert {"/data", "/dev/shm"} <= mounts, path
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-data"], path


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_tracking_uri_reaches_mlflow(overlay):
    """Entrypoint, ConfigMap, Service and MLflow's --allowed-hosts all name the same server."""
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
    args = container(one(objs, "Deployment", svc_name), "mlflow")["args"]
    allowed = arg_value(args, "--allowed-hosts").replace("$(POD_NAMESPACE)", ns).split(",")
    for host in (parts.netloc, "localhost:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), (host, allowed)


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_mlflow_server(overlay):
    objs = rendered(overlay)
    deploy = one(objs, "Deployment", "mlflow")
    c = container(deploy, "mlflow")
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert "--serve-artifacts" in args
    assert arg_value(args, "--artifacts-destination") == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert one(objs, "ConfigMap", "tldr-settings")["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    backend = arg_value(args, "--backend-store-uri")
    assert backend.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@"), backend
    from_secrets = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secrets == kc.USER_SECRETS["tldr-postgres"] | kc.USER_SECRETS["tldr-s3"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]


@pytest.mark.parametrize("overlay", kc.OVERLAYS)
def test_reaudit_cronjob(overlay):
    cron = one(rendered(overlay), "CronJob", "tldr-reaudit")
    spec = cron["spec"]
    assert kc.cron_problems(spec["schedule"]) == []
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    c = container(cron, "reaudit")
    assert c["command"] == ["python", REAUDIT_SCRIPT]
    _s, flags = kc.parse_command(c["command"] + c["args"])
    assert flags == {"--tracking-uri": "$(MLFLOW_TRACKING_URI)", "--max-age-days": "30"}


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
    script, flags = kc.parse_command(c["command"] + c["args"])
    assert script == REAUDIT_SCRIPT
    known = _require(kc.script_help_flags, REAUDIT_SCRIPT)
    assert set(flags) <= known, f"unknown to {REAUDIT_SCRIPT}: {sorted(set(flags) - known)}"


def test_readme_creates_exactly_the_referenced_secrets():
    text = (kc.K8S_DIR / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"kubectl -n tldr create secret generic (\S+)((?: +--from-literal=\S+)+)", text)
    assert commands, "k8s/README.md has no `kubectl create secret generic` commands"
    for name, literals in commands:
        keys = set(re.findall(r"--from-literal=([A-Z0-9_]+)=", literals))
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


@pytest.mark.parametrize("expr", ["0 3 * * *", "*/15 * * * *", "0 0 1,15 * *", "0 9-17/2 * * MON-FRI",
                                  "30 4 ? JAN,jul sun", "0 0 * * 0-6", "5 4 1 12 *", "@daily", "@every 1h30m"])
def test_cron_validator_accepts(expr):
    assert kc.cron_problems(expr) == []


@pytest.mark.parametrize("expr", ["", "0 3 * *", "0 0 3 * * *", "60 * * * *", "0 24 * * *", "0 0 0 * *",
                                  "0 0 * 13 *", "0 0 * * 7", "0 0 * * FUN", "*/0 * * * *", "5-1 * * * *",
                                  "0,,5 * * * *", "? * * * *", "TZ=UTC 0 3 * * *", "@fortnightly", "a b c d e"])
def test_cron_validator_rejects(expr):
    assert kc.cron_problems(expr)


# --------------------------------------------------------------------------- the image

def test_dockerfile_installs_the_project_as_the_readme_does():
    text = (kc.REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    pins = re.findall(r'"(torch(?:vision)?==[^"]+)"', (kc.REPO / "pyproject.toml").read_text())
    torch_line = next(ln for ln in lines if ln.startswith("RUN pip install") and "torch==" in ln)
    assert pins and all(pin in torch_line.split() for pin in pins), (pins, torch_line)
    assert "WORKDIR /app" in lines and "COPY . /app" in lines
    install = next(ln for ln in lines if ln.startswith("RUN pip install ."))
    assert {"psycopg2-binary", "boto3"} <= set(install.split())
    assert lines.index(torch_line) < lines.index("COPY . /app") < lines.index(install)
    assert "USER 1000:1000" in lines and lines.index("USER 1000:1000") > lines.index(install)
    ignored = (kc.REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored) and any("__pycache__" in i for i in ignored)
