"""Run a rendered manifest's container on this machine the way its pod would run it, as far as a
test can: the environment the kubelet would give it (ConfigMaps, Secrets, the downward API, `$(VAR)`
expansion), its command line, and a root file system that is read-only except where the pod mounts
writable volumes (bubblewrap: `bwrap`, which CI's .ci/run installs).

The programs themselves come from this machine (the venv's python, mlflow, ray), not from the image,
and they run as the calling user: this checks the manifests' paths and environment, not the image.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Mapping

import k8s_checks as kc

_REPO = Path(__file__).resolve().parents[2]

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


class SandboxError(RuntimeError):
    """bwrap is missing or cannot make a sandbox here (a declared test dependency)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
    and an undefined `$(VAR)` stays as it is."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def container_env(objs: list[dict], obj: dict, c: dict, secrets: Mapping[str, Mapping[str, str]],
                  fields: Mapping[str, str]) -> dict[str, str]:
    """The variables the kubelet sets: envFrom (ConfigMaps, Secrets), then env in order. `secrets` maps
    Secret name -> data (the test's stand-ins for what the user creates); `fields` the downward API."""
    ns = kc.namespace_of(obj)
    configmaps = {name: o.get("data") or {} for (n, name), o in kc._index(objs, "ConfigMap").items() if n == ns}
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            data = configmaps[src["configMapRef"]["name"]]
        else:
            data = secrets[src["secretRef"]["name"]]
        env.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        elif "fieldRef" in ref:
            env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
    return env


def command_line(c: dict, env: Mapping[str, str]) -> list[str]:
    return [expand(str(a), env) for a in list(c.get("command") or []) + list(c.get("args") or [])]


def writable_mounts(c: dict) -> list[str]:
    return [m["mountPath"] for m in c.get("volumeMounts") or [] if not m.get("readOnly")]


def find_bwrap() -> str:
    found = shutil.which("bwrap")
    if not found:
        raise SandboxError("bwrap (bubblewrap) is not installed; it is a declared test dependency: "
                           "apt-get install -y bubblewrap (CI's .ci/run installs it)")
    return found


def render_base_or_fail() -> list[dict]:
    """k8s/base rendered, after checking bwrap and kubectl are here (a missing tool fails the test clearly)."""
    import pytest

    try:
        find_bwrap()
        kc.find_kubectl()
    except (SandboxError, kc.SetupError) as e:
        pytest.fail(str(e), pytrace=False)
    return kc.render(kc.K8S_DIR / "base")


def sandboxed(argv: list[str], volumes: Mapping[str, Path], cwd: str = "/") -> list[str]:
    """`argv` under bwrap: this machine's files read-only (a fresh root that binds each top-level
    folder read-only), /proc, a minimal /dev, and each `volumes` mount path bound, writable, to the
    given host folder; then the root itself is remounted read-only. The network is shared."""
    mounted = {p.rstrip("/") or "/" for p in volumes}
    cmd = [find_bwrap(), "--die-with-parent"]
    for name in sorted(os.listdir("/")):
        path = f"/{name}"
        if name in ("proc", "dev") or path in mounted:
            continue
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif name == "tmp":
            continue  # the host's /tmp is not the pod's: only a mounted volume may stand there
        else:
            cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for mount_path in sorted(volumes, key=len):
        host = Path(volumes[mount_path])
        host.mkdir(parents=True, exist_ok=True)
        cmd += ["--bind", str(host), mount_path]
    # The checkout and the venv stay visible (read-only) even where a volume or the pod's empty /tmp
    # stands over the folder holding them (a clone under /tmp, as CI may make).
    for keep in sorted({str(_REPO), sys.prefix, os.path.realpath(sys.prefix)}):
        if keep.startswith("/tmp/") or any(keep.startswith(m.rstrip("/") + "/") for m in mounted):
            cmd += ["--ro-bind", keep, keep]
    return cmd + ["--remount-ro", "/", "--chdir", cwd, "--", *argv]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `folder` (to show nothing changed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in (".git",)]
        for f in files:
            p = Path(root, f)
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out
