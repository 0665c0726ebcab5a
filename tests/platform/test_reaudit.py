"""Re-audit (tldr_core.platform.registry.audits.reaudit, run as tune/reaudit.py): which classifier versions get
audited, the search it runs in-process with --search, the tags written back, idempotence, a model that
does not load, --dry-run; end to end on mnist-bundled with a sqlite registry. The audit itself, the
comparison and the gates: test_registry_gate.py."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import torch

from tldr_core.platform.registry.audits import reaudit as ra
from tldr_core.platform.registry.audits.audit_tags import rule_version
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import trial_runs
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

REPO = Path(__file__).resolve().parents[2]
REAUDIT = REPO / "tune" / "reaudit.py"
DATASET = "mnist-bundled"
NAME = f"tldr-classifier-{DATASET}"
TINY = ["--smoke-test", "--search", "--trials", "1", "--steps", "8", "--per-class", "2", "--quiet"]
NOW = dt.datetime(2026, 1, 31, tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------------------------ fast checks

@pytest.mark.parametrize("tags, pending", [
    ({}, True),
    ({"audit.status": "done", "audit.time": "2026-01-30T00:00:00+00:00"}, False),
    ({"audit.status": "done", "audit.time": "2025-12-01T00:00:00+00:00"}, True),        # older than 30 days
    ({"audit.status": "done", "audit.time": "2026-01-30T00:00:00+00:00", "reaudit": "requested"}, True),
    ({"audit.status": "running", "audit.started": "2026-01-30T00:00:00+00:00"}, True),  # killed midway
    ({"audit.status": "failed", "audit.time": "2026-01-30T00:00:00+00:00"}, True),      # search failed: retry
    ({"audit.status": "error", "audit.time": "2026-01-30T00:00:00+00:00"}, False),      # does not load: skip
    ({"audit.status": "error", "audit.time": "2025-12-01T00:00:00+00:00"}, True),
    ({"audit.status": "done"}, True),                                                    # no time: redo
])
def test_pending_rules(tags, pending):
    assert (ra.pending_reason(tags, 30, NOW) is not None) == pending


def _candidate(**tags) -> ra.Candidate:
    return ra.Candidate(NAME, "3", DATASET, "never audited", dict(tags))


def test_audit_search_settings_follow_the_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    space = ra.write_space(None, {"variant": "label"}, tmp_path / "space.yaml")
    opts = ra.Options(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", trials=1, steps=8, smoke_test=True, seed=3)
    st = ra.search_settings(_candidate(train_size="150"), opts, space)
    assert st.classifier == f"models:/{NAME}/3" and st.dataset == DATASET and st.train_size == 150
    assert (st.trials, st.steps, st.seed, st.per_class) == (1, 8, 3, 4)  # smoke-test per_class 4
    assert st.space["initial_points"][0] == {"variant": "label"} and st.tracking_uri == opts.tracking_uri
    assert ra.search_settings(_candidate(), opts, space).train_size == 200  # no tag: the smoke default


def test_audit_takes_the_run_id_the_search_returns(tmp_path, monkeypatch):
    from tldr_core.platform.search import driver as search

    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    space = ra.write_space(None, None, tmp_path / "space.yaml")
    opts = ra.Options(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", trials=1, steps=8, smoke_test=True)
    seen = []

    def fake_run(settings, say, address=None):
        seen.append(settings.classifier)
        say("one\ntwo")
        return "f" * 32

    monkeypatch.setattr(search, "run", fake_run)
    lines = []
    assert ra.run_search(_candidate(), opts, space, ra._echo(lines.append, False)) == ("f" * 32, None)
    assert seen == [f"models:/{NAME}/3"] and lines == ["    | one", "    | two"]

    def failing_run(settings, say, address=None):
        exc = RuntimeError("no trial finished")
        exc.search_run_id = "e" * 32
        raise exc

    monkeypatch.setattr(search, "run", failing_run)
    run_id, why = ra.run_search(_candidate(), opts, space, ra._echo(lines.append, True))
    assert run_id == "e" * 32 and why == "search failed: RuntimeError: no trial finished"
    assert len(lines) == 2  # quiet: nothing echoed


def test_help_and_unreachable_server():
    out = run_python([REAUDIT, "--help"], timeout=120)
    assert out.returncode == 0
    for flag in ("--tracking-uri", "--max-age-days", "--dry-run", "--trials", "--steps", "--smoke-test",
                 "--dataset", "--data-root", "--download", "--search", "--fail-on-regression", "--fail-on",
                 "--membership-refs", "--kkt"):
        assert flag in out.stdout, flag
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_python([REAUDIT, "--tracking-uri", f"http://127.0.0.1:{port}"], timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------ end to end

def _checkpoint(path: Path, seed: int) -> Path:
    from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
    from tldr_core.attack.models import PaperCNN

    torch.manual_seed(seed)
    model = PaperCNN((1, 28, 28), 10, width=4, hidden=8)  # untrained is fine: only the plumbing is tested
    return save_checkpoint(path, model, CLASSIFIER_FORMAT, {"test_accuracy": 0.1, "train_size": 100})


def _run(runs: Path, uri: str, *args: str):
    env = {**os.environ, "TLDR_RUNS": str(runs), "TLDR_CACHE": str(runs / "cache"), "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return run_python([REAUDIT, "--tracking-uri", uri, *args], cwd=REPO, env=env, timeout=600)


def _tags(c) -> dict[str, dict[str, str]]:
    return {str(v.version): dict(v.tags) for v in c.search_model_versions(f"name = '{NAME}'")}


@pytest.mark.slow
def test_reaudit_end_to_end(tmp_path, monkeypatch):
    from tldr_core.platform.registry.models import register_classifier

    runs = tmp_path / "runs"
    monkeypatch.setenv("TLDR_RUNS", str(runs))
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    tr.check_tracking_uri(uri)
    c = tr.client(uri)
    exp = tr.ensure_experiment(c, "classifiers", runs / "mlartifacts")
    run_id = c.create_run(exp).info.run_id
    meta = {"test_accuracy": 0.1, "train_size": 100}
    # the new version first: nothing before it to compare with (a later version would first re-audit the
    # hand-tagged one, whose audit has no files to compare with)
    v_new = register_classifier(c, run_id, _checkpoint(tmp_path / "b" / "b.pt", 1), DATASET, meta).version
    v_audited = register_classifier(c, run_id, _checkpoint(tmp_path / "a" / "a.pt", 0), DATASET, meta).version
    corrupt = tmp_path / "c" / "c.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint" * 64)
    v_bad = register_classifier(c, run_id, corrupt, DATASET, meta).version
    c.set_terminated(run_id)
    audited = {"audit.status": "done", "audit.time": ra.now_iso(), "audit.quality": "0.1", "audit.risk": "LOW",
               "audit.rule_version": rule_version()}  # audited under the current rule: up to date
    for k, v in audited.items():
        c.set_model_version_tag(NAME, v_audited, k, v)
    before = _tags(c)

    # --dry-run: lists the two pending versions, changes nothing
    out = _run(runs, uri, "--dry-run", *TINY)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 version(s) to audit, 1 up to date" in out.stdout
    assert f"{NAME}/{v_new}: never audited" in out.stdout and f"{NAME}/{v_bad}: never audited" in out.stdout
    assert _tags(c) == before

    # the real run: the new version is audited, the corrupt one is tagged with its error, the audited one kept
    out = _run(runs, uri, *TINY)
    print(out.stdout)  # shown by pytest -s / on failure
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "1 done, 1 model(s) that do not load, 0 failed" in out.stdout, out.stdout
    after = _tags(c)
    assert after[v_audited] == before[v_audited], (after, out.stdout)
    new = after[v_new]
    assert new["audit.status"] == "done" and new["audit.risk"] in ("LOW", "MEDIUM", "HIGH")
    for k in ("audit.quality", "audit.gap", "audit.coverage", "audit.gap_ci_low"):
        float(new[k])
    assert ra.parse_iso(new["audit.time"]) is not None and "audit.error" not in new
    assert c.get_run(new["audit.run_id"]).data.tags["tldr.reaudit"] == "true"  # the audit's own run
    search = c.get_run(new["audit.search_run"])
    assert search.data.tags["tldr.classifier_version"] == v_new and search.info.status == "FINISHED"
    champion = c.get_model_version_by_alias(f"tldr-generator-{DATASET}", "champion")  # promoted as the search does
    assert champion.tags["classifier_version"] == v_new
    bad = after[v_bad]
    assert bad["audit.status"] == "error" and "not a readable PyTorch checkpoint" in bad["audit.error"]
    assert "audit.run_id" not in bad
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 3  # the audit registers no classifier

    # a second run right after does nothing
    out = _run(runs, uri, *TINY)
    assert out.returncode == 0 and "0 version(s) to audit, 3 up to date" in out.stdout, out.stdout + out.stderr
    assert _tags(c) == after

    # a run killed midway leaves audit.status=running: the next run audits it again (listed by --dry-run);
    # reaudit=requested forces one
    c.set_model_version_tag(NAME, v_new, "audit.status", "running")
    c.set_model_version_tag(NAME, v_audited, "reaudit", "requested")
    out = _run(runs, uri, "--dry-run")
    assert out.returncode == 0 and "2 version(s) to audit" in out.stdout, out.stdout + out.stderr
    assert f"{NAME}/{v_new}: previous audit" in out.stdout and f"{NAME}/{v_audited}: re-audit requested" in out.stdout

    # ... and is warm-started from the champion's settings, enqueued as the first point of its search space
    from tldr_core.platform.search.spaces.load import load_space

    point, source = ra.warm_start_point(c, DATASET, load_space())
    assert point and "variant" in point and f"tldr-generator-{DATASET} v{champion.version}" in source
    c.delete_model_version_tag(NAME, v_audited, "reaudit")
    out = _run(runs, uri, *TINY)
    print(out.stdout)
    assert out.returncode == 0 and "1 done, 0 model(s)" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
    again = _tags(c)[v_new]
    assert again["audit.status"] == "done" and again["audit.search_run"] != new["audit.search_run"]
    assert again["audit.warm_start"] == source
    import mlflow

    settings = mlflow.artifacts.load_dict(f"{c.get_run(again['audit.search_run']).info.artifact_uri}/search/settings.json")
    assert settings["space"]["initial_points"][0] == point
    trial0 = [r for r in trial_runs(c, search.info.experiment_id, again["audit.search_run"])
              if r.data.tags.get(tr.TRIAL_NUMBER) == "1"]
    assert trial0 and trial0[0].data.params["variant"] == point["variant"]
