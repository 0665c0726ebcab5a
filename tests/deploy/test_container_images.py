"""The two images k8s/ runs, read offline (no Docker engine here): Dockerfile (the search, the
re-audit, KubeRay's submitter) and Dockerfile.mlflow (the tracking server). What they install must
be what the manifests and this venv's tests assume: the same Ray as the manifests' rayVersion, with
the dashboard's Jobs API; the project non-editable; the same MLflow and PostgreSQL driver the tests
run; every writable path outside the image, where the pods mount volumes."""
from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_checks as kc  # noqa: E402
import k8s_hardening as kh  # noqa: E402

PYPROJECT = (kc.REPO / "pyproject.toml").read_text()


def instructions(name: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (kc.REPO / name).read_text().replace("\\\n", " ")
    return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def env_of(lines: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ln in lines:
        if ln.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", ln)))
    return env


def extra(name: str) -> list[str]:
    extras = tomllib.loads(PYPROJECT)["project"]["optional-dependencies"]
    assert name in extras, f"pyproject.toml has no [{name}] extra"
    return extras[name]


def rendered(overlay: str) -> list[dict]:
    try:
        kc.find_kubectl()
    except kc.SetupError as e:
        pytest.fail(str(e), pytrace=False)
    return kc.render_overlay(overlay)


def test_project_image_installs_the_project_non_editable_with_the_cluster_extra():
    lines = instructions("Dockerfile")
    assert lines[0] == "FROM python:3.11-slim"
    pins = re.findall(r'"(torch(?:vision)?==[^"]+)"', PYPROJECT)
    torch_line = next(ln for ln in lines if ln.startswith("RUN pip install") and "torch==" in ln)
    assert pins and all(pin in torch_line.split() for pin in pins), (pins, torch_line)
    assert "WORKDIR /app" in lines and "COPY . /app" in lines
    install = next(ln for ln in lines if ln.startswith("RUN pip install \".["))
    assert install.split()[3] == '".[platform,cluster]"' and "-e" not in install.split() and "boto3" in install
    assert lines.index(torch_line) < lines.index("COPY . /app") < lines.index(install)
    assert "USER 1000:1000" in lines and lines.index("USER 1000:1000") > lines.index(install)
    assert "wget" in next(ln for ln in lines if "apt-get install" in ln)  # KubeRay's probes call it
    ignored = (kc.REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git", "mlruns"} <= set(ignored) and any("__pycache__" in i for i in ignored)


def test_ray_is_the_same_everywhere():
    """The cluster extra's Ray (with `default`, the dashboard and Jobs API KubeRay submits through) is the
    version the manifests declare and the one these tests run."""
    (ray_pin,) = [r for r in extra("cluster") if r.startswith("ray[")]
    name, version = ray_pin.split("==")
    assert {"default", "tune"} <= set(name[4:-1].split(","))
    assert f"ray[default]=={version}" in extra("test")
    assert metadata.version("ray") == version
    for overlay in kc.OVERLAYS:
        for obj in rendered(overlay):
            for _path, rcs in kc.raycluster_specs(obj):
                assert rcs["rayVersion"] == version, kc.where(obj)


def test_project_image_paths_match_the_manifests():
    """The image's defaults for every writable path are the ones the pods get, none under /app, and
    the image creates the mount points it needs without making /app writable."""
    lines = instructions("Dockerfile")
    env = env_of(lines)
    objs = rendered("gpu")
    settings = {**kc._index(objs, "ConfigMap")[("tldr", "tldr-settings")]["data"],
                **kc._index(objs, "ConfigMap")[("tldr", "tldr-paths")]["data"]}
    for var in ("HOME", "TMPDIR", "MPLCONFIGDIR", "TLDR_RUNS", "TLDR_CACHE", "TLDR_DATA_ROOT"):
        assert env.get(var) == settings[var], var
        assert not env[var].startswith("/app"), var
    assert not any("chown" in ln and "/app" in ln for ln in lines)
    mkdir = next(ln for ln in lines if "mkdir -p /runs /data" in ln)
    assert "chown 1000:1000 /runs /data" in mkdir


def test_mlflow_image_is_the_slim_image_plus_driver_boto3_and_auth():
    lines = instructions("Dockerfile.mlflow")
    mlflow_version = metadata.version("mlflow")
    assert lines[0] == f"FROM ghcr.io/mlflow/mlflow:v{mlflow_version}"
    install = next(ln for ln in lines if ln.startswith("RUN pip install"))
    packages = re.findall(r'"([^"]+)"', install)
    assert f"mlflow[auth]=={mlflow_version}" in packages
    assert f"psycopg2-binary=={metadata.version('psycopg2-binary')}" in packages
    assert any(p.startswith("boto3") for p in packages) and len(packages) == 3
    assert lines[-1] == "USER 1000:1000"
    assert env_of(lines).get("HOME") == "/tmp" and env_of(lines).get("TMPDIR") == "/tmp"
    for overlay in kc.OVERLAYS:
        images = {c["image"] for o in rendered(overlay) for _p, c, _pod in kc.containers(o) if "tldr-mlflow" in c["image"]}
        assert images and all(i.endswith(f":{mlflow_version}") for i in images), images
        assert all(kh.own_image(i) for i in images)
