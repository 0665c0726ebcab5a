"""The audit in MLflow (`tldr audit --tracking-uri`, platform/audit_tracking.py): one run with the
audit's params, scores, baselines, verdict, files, data sets and generator, in the data set's
experiment (never experiment 0); a registered classifier (`--classifier models:/...`) audited and its
version tagged with the verdict; nothing created in the store when the inputs are wrong."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tldr_core.platform.tracking import store as tr
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits-8x8", "--train-size", "100", "--smoke-test", "--steps", "6", "--per-class", "2",
        "--quiet"]


def audit(tmp_path: Path, *args: str):
    env = {**os.environ, "TLDR_RUNS": str(tmp_path / "runs"), "TLDR_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return run_python(["-m", "tldr_core.cli.main", "audit", *args], cwd=tmp_path, env=env, timeout=900)


def _audit_runs(c, exp: str) -> list:
    return c.search_runs([exp], f"tags.`{tr.ROLE}` = 'audit'", order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_audit_logs_one_run_and_tags_the_registered_classifier(tmp_path):
    from tldr_core.platform.registry.models import register_classifier

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    first = audit(tmp_path, *TINY, "--out", str(tmp_path / "a"), "--tracking-uri", uri)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    record = json.loads((tmp_path / "a" / "metrics.json").read_text())
    c = tr.client(uri)
    exp = c.get_experiment_by_name("tldr-digits-8x8").experiment_id
    (run,) = _audit_runs(c, exp)
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and t[tr.END] == "finished" and t["mlflow.source.name"] == "tldr audit"
    assert t["tldr.risk"] == record["risk"] and m["verdict/level"] == ["LOW", "MEDIUM", "HIGH"].index(record["risk"])
    assert m["eval/quality"] == pytest.approx(record["metrics"]["quality"])
    assert m["baseline/noise/quality"] == pytest.approx(record["baselines"]["noise"]["quality"])
    assert run.data.params["steps"] == "6" and run.data.params["train_size"] == "100"
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "grid.png", "generator.pt"} <= arts
    (out,) = c.get_run(run.info.run_id).outputs.model_outputs
    assert c.get_logged_model(out.model_id).experiment_id == exp
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"digits-8x8/train", "digits-8x8/heldout",
                                                                    "digits-8x8/test"}
    assert c.search_runs(["0"]) == [] and not (tmp_path / "mlruns").exists()

    # the same classifier, registered, audited by its registry URI: the version gets the verdict
    holder = c.create_run(exp).info.run_id
    ref = register_classifier(c, holder, record["classifier"]["path"], "digits-8x8", {"train_size": 100})
    c.set_terminated(holder)
    second = audit(tmp_path, *TINY, "--out", str(tmp_path / "b"), "--classifier", ref.uri, "--tracking-uri", uri)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    record2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert record2["classifier"]["path"] == ref.uri and record2["classifier"]["registry"]["version"] == ref.version
    (_, audit2) = _audit_runs(c, exp)
    tags = c.get_model_version(ref.name, ref.version).tags
    assert tags["audit.status"] == "done" and tags["audit.risk"] == record2["risk"]
    assert tags["audit.run_id"] == audit2.info.run_id and float(tags["audit.quality"]) == pytest.approx(
        record2["metrics"]["quality"], rel=1e-5)
    env = {**os.environ, "TLDR_RUNS": str(tmp_path / "runs")}
    dry = run_python([REPO / "tune" / "reaudit.py", "--tracking-uri", uri, "--dry-run"], env=env, timeout=300)
    # recorded, but not the re-audit's (no rule version, no comparison): it audits the version in full
    assert dry.returncode == 0 and "1 version(s) to audit, 0 up to date" in dry.stdout, dry.stdout + dry.stderr
    assert "stale audit: audited under rule none" in dry.stdout and "never audited" not in dry.stdout


@pytest.mark.parametrize("extra, message", [
    (["--classifier", "models:/tldr-classifier-digits-8x8/1"], "does not exist, so it holds no registered model"),
    (["--classifier", "models:/nope"], "is not a registry URI"),
])
def test_a_registry_classifier_needs_an_existing_store(tmp_path, extra, message):
    uri = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    out = audit(tmp_path, *TINY, "--out", str(tmp_path / "a"), "--tracking-uri", uri, *extra)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "missing" / "mlflow.db").exists() and not (tmp_path / "a").exists()


def test_bad_data_creates_nothing_in_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = audit(tmp_path, "--dataset", "image-folder", "--data-root", str(tmp_path / "nowhere"), "--out",
                str(tmp_path / "a"), "--tracking-uri", uri)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
    assert not (tmp_path / "store" / "mlflow.db").exists()
