"""Hardening checks for the rendered k8s/ overlays (used by tests/deploy/test_k8s_hardening.py and
by test_k8s.py's every-check test), on top of k8s_checks' schema and correctness checks:

* read-only-root: every container, init container and KubeRay autoscaler runs with
  readOnlyRootFilesystem: true;
* writable-path: every path a program is told to write to (HOME, TMPDIR, TLDR_RUNS, ...) lies on a
  writable volume mounted in that container, and the project's containers say where HOME and
  TMPDIR are (the Ray containers also TLDR_RUNS, TLDR_CACHE and TLDR_DATA_ROOT);
* ray-auth: every Ray cluster has token authentication (authOptions.mode token) and every
  container that talks to it (Ray pods, KubeRay's submitter, `ray job submit` callers, the
  autoscaler) has RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret; nothing says disabled;
* secret-in-args: no Secret-backed variable is expanded into a command line (`$(VAR)` in
  command/args), where the process list would show it;
* network-policy: every namespace with pods has a default-deny policy for ingress and egress.

Like k8s_checks, each problem is a Finding whose `check` names the rule.
"""
from __future__ import annotations

import posixpath
from typing import Iterator

import k8s_checks as kc
from k8s_checks import Finding

#: environment variables whose value is a folder the program writes to
PATH_VARS = ("HOME", "TMPDIR", "MPLCONFIGDIR", "TLDR_RUNS", "TLDR_CACHE", "TLDR_DATA_ROOT", "PGDATA",
             "RAY_TMPDIR", "MLFLOW_TMP_DIR")
#: what every container of the project's images must define, and the Ray containers in addition
OWN_IMAGE_VARS = ("HOME", "TMPDIR")
RAY_NODE_VARS = ("TLDR_RUNS", "TLDR_CACHE", "TLDR_DATA_ROOT")
RAY_KINDS = ("RayJob", "RayCluster", "RayCronJob")


def own_image(image: str) -> bool:
    """The project's images: `tldr`/`tldr-mlflow` in the base, <registry>/tldr[-mlflow]:tag rendered."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    return name in ("tldr", "tldr-mlflow")


def ray_node_containers(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(path, Ray container, pod spec) of every head and worker group: containers[0], as KubeRay reads it."""
    for path, rcs in kc.raycluster_specs(obj):
        groups = [("headGroupSpec", rcs.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g or {}) for i, g in enumerate(rcs.get("workerGroupSpecs") or [])]
        for gpath, group in groups:
            pod = ((group.get("template") or {}).get("spec")) or {}
            for c in (pod.get("containers") or [])[:1]:
                yield f"{path}.{gpath}", c, pod


def resolved_env(objs: list[dict], obj: dict, c: dict) -> dict[str, str | None]:
    """The container's variables: envFrom ConfigMaps, then env (plain values; None for values from a
    Secret or the downward API), with `$(VAR)` expanded as the kubelet does."""
    env: dict[str, str | None] = {}
    ns = kc.namespace_of(obj)
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            cm = kc._index(objs, "ConfigMap").get((ns, ref.get("name"))) or {}
            env.update({src.get("prefix", "") + k: v for k, v in (cm.get("data") or {}).items()})
    for e in c.get("env") or []:
        if "value" in e:
            value = str(e["value"])
            for var in kc.DEPENDENT_VAR.findall(value):
                if env.get(var) is not None:
                    value = value.replace(f"$({var})", env[var])
            env[e["name"]] = value
        else:
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            cm = kc._index(objs, "ConfigMap").get((ns, (ref or {}).get("name"))) or {}
            env[e["name"]] = (cm.get("data") or {}).get(ref.get("key")) if ref else None
    return env


def _writable_mounts(c: dict) -> list[str]:
    return [m["mountPath"].rstrip("/") or "/" for m in c.get("volumeMounts") or [] if not m.get("readOnly")]


def _under(path: str, mounts: list[str]) -> bool:
    path = posixpath.normpath(path)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_read_only_root(obj: dict) -> list[Finding]:
    out = [Finding("read-only-root", kc.where(obj), f"{path}: readOnlyRootFilesystem is not true")
           for path, c, _pod in kc.containers(obj)
           if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True]
    for path, rcs in kc.raycluster_specs(obj):
        sc = (rcs.get("autoscalerOptions") or {}).get("securityContext") or {}
        if rcs.get("enableInTreeAutoscaling") and sc.get("readOnlyRootFilesystem") is not True:
            out.append(Finding("read-only-root", kc.where(obj),
                               f"{path}.autoscalerOptions: readOnlyRootFilesystem is not true"))
    return out


def check_writable_paths(objs: list[dict]) -> list[Finding]:
    out = []
    for obj in objs:
        ray_paths = {id(c) for _p, c, _pod in ray_node_containers(obj)}
        for path, c, _pod in kc.containers(obj):
            env, mounts = resolved_env(objs, obj, c), _writable_mounts(c)
            required = list(OWN_IMAGE_VARS) if own_image(str(c.get("image", ""))) else []
            required += list(RAY_NODE_VARS) if id(c) in ray_paths else []
            for var in required:
                if env.get(var) is None:
                    out.append(Finding("writable-path", kc.where(obj), f"{path}: {var} is not set"))
            for var in PATH_VARS:
                value = env.get(var)
                if value is not None and not (value.startswith("/") and _under(value, mounts)):
                    out.append(Finding("writable-path", kc.where(obj),
                                       f"{path}: {var}={value} is not on a writable volume (mounts: {mounts})"))
    return out


def _token_env_problems(c: dict) -> list[str]:
    env = {e.get("name"): e for e in c.get("env") or []}
    problems = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append("RAY_AUTH_MODE is not token")
    if not ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef"):
        problems.append("RAY_AUTH_TOKEN does not come from a Secret")
    return problems


def _ray_clients(obj: dict) -> Iterator[tuple[str, dict]]:
    """Containers that talk to a Ray cluster: Ray nodes, KubeRay's submitter, `ray job ...` callers."""
    yield from ((p, c) for p, c, _pod in ray_node_containers(obj))
    for path, tpl in kc.pod_templates(obj):
        for c in (tpl.get("spec") or {}).get("containers") or []:
            cmd = list(c.get("command") or []) + list(c.get("args") or [])
            if path.endswith("submitterPodTemplate") or cmd[:2] == ["ray", "job"]:
                yield f"{path}({c.get('name')})", c
    for path, rcs in kc.raycluster_specs(obj):
        if rcs.get("enableInTreeAutoscaling"):
            yield f"{path}.autoscalerOptions", rcs.get("autoscalerOptions") or {}


def check_ray_auth(obj: dict) -> list[Finding]:
    out = []
    for path, rcs in kc.raycluster_specs(obj):
        if (rcs.get("authOptions") or {}).get("mode") != "token":
            out.append(Finding("ray-auth", kc.where(obj), f"{path}.authOptions.mode is not token"))
    for path, c in _ray_clients(obj):
        out += [Finding("ray-auth", kc.where(obj), f"{path}: {p}") for p in _token_env_problems(c)]
    others = [(p, c) for p, c, _pod in kc.containers(obj)]
    others += [(f"{p}.autoscalerOptions", rcs.get("autoscalerOptions") or {}) for p, rcs in kc.raycluster_specs(obj)]
    for path, c in others:
        for e in c.get("env") or []:
            if e.get("name") == "RAY_AUTH_MODE" and e.get("value") != "token":
                out.append(Finding("ray-auth", kc.where(obj), f"{path}: RAY_AUTH_MODE={e.get('value')!r}"))
    return out


def check_secret_args(obj: dict) -> list[Finding]:
    out = []
    for path, c, _pod in kc.containers(obj):
        secret_vars = {e["name"] for e in c.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})}
        for text in list(c.get("command") or []) + list(c.get("args") or []):
            for var in set(kc.DEPENDENT_VAR.findall(str(text))) & secret_vars:
                out.append(Finding("secret-in-args", kc.where(obj),
                                   f"{path}: $({var}) puts a Secret on the command line (process list); "
                                   "pass it in the environment"))
    return out


def _is_default_deny(policy: dict) -> bool:
    spec = policy.get("spec") or {}
    return (spec.get("podSelector") in ({}, None) and {"Ingress", "Egress"} <= set(spec.get("policyTypes") or [])
            and not spec.get("ingress") and not spec.get("egress"))


def check_network_policies(objs: list[dict]) -> list[Finding]:
    namespaces = {kc.namespace_of(o) for o in objs if any(True for _ in kc.pod_templates(o))}
    denied = {kc.namespace_of(o) for o in objs if o.get("kind") == "NetworkPolicy" and _is_default_deny(o)}
    return [Finding("network-policy", f"namespace {ns}", "no default-deny NetworkPolicy (ingress and egress)")
            for ns in sorted(namespaces - denied, key=str)]


def run_hardening_checks(objs: list[dict]) -> list[Finding]:
    findings: list[Finding] = []
    for obj in objs:
        for check in (check_read_only_root, check_ray_auth, check_secret_args):
            findings += check(obj)
    return findings + check_writable_paths(objs) + check_network_policies(objs)
