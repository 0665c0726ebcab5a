"""Re-audits that guard the registry (issue 22): every axis of the verdict on the version, the comparison
with the version it would replace (a paired bootstrap on the same T and H'), the gate on `tldr reaudit`
and on `tldr registry promote NAME VERSION`, and the model's history run.

The slow part registers three versions of one lineage (tests/registry_versions.py: clean, leaky, clean
retrain), re-audits them once for the module (smoke sizes, loss and margin membership) and checks what
that left; the fast part checks the rules on tags alone."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import registry_versions as rv
from tldr_core.platform.registry.audits import audit_tags as at
from tldr_core.platform.registry.audits.compare_versions import expected_baseline, lineage_difference
from tldr_core.platform.registry.audits.gate import stale_reason
from tldr_core.platform.registry.audits.reaudit import pending_reason

NAME = rv.NAME


# ------------------------------------------------------------------------------------ fast checks

class _V:  # a ModelVersion as expected_baseline reads it
    def __init__(self, version: int, **tags: str) -> None:
        self.version, self.tags = str(version), tags


def test_the_version_it_would_replace():
    vs = [_V(1), _V(2, **{"audit.status": "error"}), _V(3), _V(4)]
    assert expected_baseline("4", vs, None) == ("3", "the previous version (no champion alias is set)")
    assert expected_baseline("3", vs, None)[0] == "1"  # version 2 does not load: skipped
    assert expected_baseline("4", vs, "1") == ("1", "the champion (alias champion -> version 1)")
    assert expected_baseline("1", vs, "1")[0] is None  # the champion itself, nothing before it
    assert expected_baseline("1", vs, None)[0] is None


def test_stale_and_pending_rules():
    import datetime as dt

    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    fresh = {"audit.status": "done", "audit.time": "2026-11-30T00:00:00+00:00", at.RULE_VERSION: at.rule_version(),
             "sha256": "a" * 64, at.SHA256: "a" * 64, at.COMPARED_WITH: "models:/m/1"}
    assert stale_reason(fresh, "models:/m/1") == "" and pending_reason(fresh, 30, now, check_rule=True) is None
    assert "rule" in stale_reason({**fresh, at.RULE_VERSION: "1-00000000"})
    assert "none (a search or tldr audit" in stale_reason({k: v for k, v in fresh.items() if k != at.RULE_VERSION})
    assert "file changed" in stale_reason({**fresh, at.SHA256: "b" * 64})
    assert "would now replace models:/m/2" in stale_reason(fresh, "models:/m/2")
    assert "stale audit" in pending_reason(fresh, 30, now, "models:/m/2")
    assert pending_reason({**fresh, at.RULE_VERSION: "1-0"}, 30, now) is None  # the rule checked only when asked


def test_rule_version_follows_the_thresholds(monkeypatch):
    from tldr_core.scoring import risk

    before = at.rule_version()
    assert before.startswith(at.RULE_SERIES + "-")
    monkeypatch.setitem(risk.THRESHOLDS, "high_tpr_ci_low", 0.2)
    assert at.rule_version() != before


def test_lineages_must_match_field_by_field():
    a = {"dataset": "d", "data_seed": 0, "train_size": 100, "heldout_size": 100, "train_digest": "x", "heldout_digest": "y"}
    assert lineage_difference(a, dict(a)) == ""
    assert lineage_difference(a, {**a, "data_seed": 1}) == "lineages differ: data_seed 0 vs 1"
    assert "unknown" in lineage_difference(a, {})


def test_comparison_tags():
    cmp = {"regression": True, "regressed_axes": ["membership.margin"], "paired": True, "note": "",
           "axes": [{"axis": "membership.margin", "differences": {"auc": {"delta": 0.15, "ci_low": 0.1, "ci_high": 0.2}}}]}
    tags = at.comparison_tags(cmp, "models:/m/1", "the previous version")
    assert tags[at.REGRESSION] == "true" and tags[at.REGRESSION_AXES] == "membership.margin"
    assert (tags["audit.delta.membership.margin.auc"], tags["audit.delta.membership.margin.auc_lo"]) == ("0.15", "0.1")
    assert at.comparison_tags(None, None, "nothing")[at.COMPARED_WITH] == "none"


def test_a_kkt_search_is_the_audits_kkt_attack_through_its_pooled_candidates(monkeypatch, tmp_path):
    """--search --search-attack kkt: the audit's KKT reconstructions are the search's pooled union."""
    from types import SimpleNamespace

    import torch

    from tldr_core.attack.output import AttackOutput
    from tldr_core.platform.registry.audits import version_audit
    from tldr_core.platform.search import pooled

    union = AttackOutput(kind="kkt", images=torch.zeros(4, 1, 8, 8), labels=torch.tensor([0, 0, 1, 1]))
    seen = []
    monkeypatch.setattr(pooled, "pooled_candidates",
                        lambda c, run_id, dest, shape: (seen.append((run_id, shape)) or (union, [], [])))
    run = SimpleNamespace(data=SimpleNamespace(tags={"tldr.attack": "kkt"}), info=SimpleNamespace(experiment_id="1"))
    client = SimpleNamespace(get_run=lambda run_id: run)
    got = version_audit.search_outputs(client, "s" * 32, SimpleNamespace(image_shape=(1, 8, 8)), tmp_path)
    assert got == {"kkt": union} and seen == [("s" * 32, (1, 8, 8))]
    assert [version_audit._typed(v) for v in ("0.5", "400", "True", "label")] == [0.5, 400, True, "label"]


# ------------------------------------------------------------------------------------ three versions

def _main(module, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def reaudited(tmp_path_factory):
    """(client, uri, versions, exit status, stdout, stderr) after one re-audit of the three versions."""
    from tldr_core.platform.registry.audits import reaudit_cli
    from tldr_core.platform.tracking import store as tr

    work = tmp_path_factory.mktemp("gate")
    mp = pytest.MonkeyPatch()
    mp.setenv("TLDR_RUNS", str(work / "runs"))
    mp.setenv("TLDR_CACHE", str(work / "cache"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    versions = rv.register_versions(uri, work / "models")
    rc, out, err = _main(reaudit_cli, ["--tracking-uri", uri, "--fail-on-regression", *rv.FAST])
    yield tr.client(uri), uri, versions, rc, out, err
    mp.undo()


def _tags(c, version: str) -> dict[str, str]:
    return dict(c.get_model_version(NAME, version).tags)


@pytest.mark.slow
def test_the_leaky_version_is_a_regression_and_the_others_are_not(reaudited):
    c, _uri, (v1, v2, v3), rc, out, err = reaudited
    assert rc == 3, out + err
    assert f"gate: models:/{NAME}/{v2} regressed against models:/{NAME}/{v1}" in err and f"{NAME}/{v3} regressed" not in err
    t1, t2, t3 = (_tags(c, v) for v in (v1, v2, v3))
    assert t1[at.REGRESSION] == "false" and t1[at.COMPARED_WITH] == "none"
    assert t2[at.REGRESSION] == "true" and t2["audit.lineage_match"] == "true"
    assert "membership.margin" in t2[at.REGRESSION_AXES].split(",")
    lo, hi = float(t2["audit.delta.membership.margin.auc_lo"]), float(t2["audit.delta.membership.margin.auc_hi"])
    assert 0 < lo < float(t2["audit.delta.membership.margin.auc"]) < hi  # the interval excludes 0
    assert t3[at.REGRESSION] == "false" and t3[at.COMPARED_WITH] == f"models:/{NAME}/{v2}"
    assert all(float(v) <= 0 for k, v in t3.items() if k.startswith("audit.delta.") and k.endswith("_lo")
               and v != "nan")
    for t in (t1, t2, t3):
        assert t[at.RULE_VERSION] == at.rule_version() and t[at.SHA256] == t["sha256"] and t["audit.status"] == "done"


@pytest.mark.slow
def test_the_deltas_are_the_paired_bootstrap_of_the_two_runs_files(reaudited, tmp_path):
    """The tag is recomputed from the per-image files of both audit runs (membership.csv): same number."""
    from tldr_core.platform.registry.audits.compare_versions import download_scores
    from tldr_core.scoring.compare import compare_axis

    c, _uri, (v1, v2, _v3), *_ = reaudited
    a, b = (download_scores(c, _tags(c, v)["audit.run_id"], tmp_path / v) for v in (v1, v2))
    assert a.missing == [] and b.missing == [] and set(a.exposure) == {"tldr", "kkt"}
    got = compare_axis("membership.margin", (a.membership["margin"][0], b.membership["margin"][0]),
                       (a.membership["margin"][1], b.membership["margin"][1]))
    t2 = _tags(c, v2)
    assert float(t2["audit.delta.membership.margin.auc"]) == pytest.approx(got.differences["auc"].delta, abs=1e-5)
    assert float(t2["audit.delta.membership.margin.auc_lo"]) == pytest.approx(got.differences["auc"].ci[0], abs=1e-5)


@pytest.mark.slow
def test_every_axis_is_tagged_and_the_run_holds_the_whole_audit(reaudited, tmp_path):
    c, _uri, (_v1, v2, _v3), *_ = reaudited
    t = _tags(c, v2)
    assert t["audit.risk"] in ("LOW", "MEDIUM", "HIGH") and t["audit.membership"] in ("LOW", "MEDIUM", "HIGH")
    assert set(t["audit.attacks"].split(",")) == {"tldr", "kkt", "templates"}  # an MLP: KKT and templates apply
    for k in ("audit.criterion", "audit.membership_criterion", "audit.exposure_auc", "audit.exposure_tpr_lo",
              "audit.membership_auc", "audit.membership_tpr", "audit.stationarity_residual", "audit.quality",
              "audit.exposure_auc.kkt", "audit.verdict"):
        assert t.get(k), k
    run = c.get_run(t["audit.run_id"])
    assert run.data.tags["tldr.reaudit"] == "true" and run.data.tags["tldr.regression"] == "true"
    assert run.data.metrics["compare/membership.margin/auc_lo"] > 0
    names = {f.path for f in c.list_artifacts(run.info.run_id)} | {f.path for f in c.list_artifacts(run.info.run_id, "kkt")}
    assert {"report.html", "metrics.json", "exposure.csv", "exposure_heldout.csv", "membership.csv", "comparison.json",
            "lineage.json", "kkt/exposure_heldout.csv"} <= names
    html = Path(c.download_artifacts(run.info.run_id, "report.html", str(tmp_path))).read_text()
    assert "Compared with the version it would replace" in html and "Regression</b> on membership.margin" in html
    assert f"History of {NAME}" in html and t["audit.history_run"] in html
    assert "KKT candidates" in html  # the other attack is judged in the page's own verdict too


@pytest.mark.slow
def test_the_history_run_holds_the_chart_and_the_numbers(reaudited, tmp_path):
    c, _uri, versions, *_ = reaudited
    hist = _tags(c, versions[-1])["audit.history_run"]
    assert {_tags(c, v)["audit.history_run"] for v in versions} == {hist}
    assert {"history.png", "history.csv", "history.json"} <= {f.path for f in c.list_artifacts(hist)}
    data = json.loads(Path(c.download_artifacts(hist, "history.json", str(tmp_path))).read_text())
    assert [r["version"] for r in data["versions"]] == [int(v) for v in versions]
    assert [r["regression"] for r in data["versions"]] == ["false", "true", "false"]
    steps = sorted(m.step for m in c.get_metric_history(hist, "history/membership_auc"))
    assert steps == [int(v) for v in versions]


@pytest.mark.slow
def test_promotion_is_gated_and_force_is_tagged(reaudited):
    from tldr_core.platform.registry import cli

    c, uri, (v1, v2, v3), *_ = reaudited
    assert _main(cli, ["--tracking-uri", uri, "promote", NAME, v1])[0] == 0  # clean, nothing to compare with
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == v1
    rc, _out, err = _main(cli, ["--tracking-uri", uri, "promote", NAME, v2])
    assert rc == 3 and f"refused: models:/{NAME}/{v2}: regressed against models:/{NAME}/{v1}" in err
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == v1
    assert _tags(c, v2)["promotion"].startswith("refused at ")
    rc, out, err = _main(cli, ["--tracking-uri", uri, "promote", NAME, v2, "--force"])
    assert rc == 0 and "(forced; tagged)" in out and "overridden" in err
    t2 = _tags(c, v2)
    assert t2["promotion.forced"] == "true" and t2["promotion.forced_by"] and t2["promotion.forced_at"]
    assert "regressed" in t2["promotion.overridden"]
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == v2
    # version 3 was compared with version 2, the champion now: allowed; a stale rule or file is not
    from tldr_core.platform.registry.audits.gate import gate_reasons

    assert gate_reasons(c, NAME, v3) == []
    c.set_model_version_tag(NAME, v3, at.SHA256, "0" * 64)
    assert any("artifacts changed" in r for r in gate_reasons(c, NAME, v3))
    c.set_model_version_tag(NAME, v3, at.RULE_VERSION, "1-old")
    assert any(r.startswith("stale: audited under rule 1-old") for r in gate_reasons(c, NAME, v3, check_file=False))
    rc, _out, err = _main(cli, ["--tracking-uri", uri, "promote", NAME, "99"])
    assert rc == 2 and "no such registered model version" in err


@pytest.mark.parametrize("argv, says", [
    (["promote", "tldr-classifier-x"], "promote takes NAME VERSION (a registered model and a version) or --search-run"),
    (["promote", "tldr-classifier-x", "1", "2"], "promote takes NAME VERSION"),
    (["promote", "tldr-classifier-x", "1", "--search-run", "abc"], "promote takes NAME VERSION"),
    (["promote", "--search-run", "abc", "--force"], "--force applies to promote NAME VERSION, not to --search-run"),
])
def test_promote_with_the_wrong_arguments_is_one_clear_line(tmp_path, argv, says):
    from tldr_core.platform.registry import cli

    rc, out, err = _main(cli, ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *argv])
    assert rc == 2 and out == "", out
    (line,) = [e for e in err.splitlines() if e.startswith("error:")]  # (MLflow logs the new store's creation)
    assert says in line and "Traceback" not in err, err
