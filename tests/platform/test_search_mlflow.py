"""A search recorded the way MLflow users expect (issue 13): models, data sets and source tags in the
search's own experiment (nothing in experiment 0, no ./mlruns), grouped metric names with the
objective first, baselines once on the search run, importances only with enough trials, the
classifier counted as audited; and a true end state when a worker dies (issue 14 #9; a search interrupted
between and mid-trial: tests/platform/test_search.py). The smoke search is the session fixture of conftest.py."""
from __future__ import annotations

import mlflow
import pytest

from search_helpers import REAUDIT, client_of, run_search, searches_of
from tldr_core.platform.search.spaces.load import load_space
from tldr_core.platform.search.summary import MIN_IMPORTANCE_TRIALS, param_importances
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import TrialSummary, trial_runs


def _finished(c, exp, search):
    return [t for t in trial_runs(c, exp, search.info.run_id) if t.data.tags[tr.END] != "failed"]


@pytest.mark.slow
def test_models_datasets_and_source_land_in_the_search_experiment(smoke):
    runs, _proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    assert not (runs.parent / "mlruns").exists()  # the search ran from runs/.. : no stray store there
    assert c.search_runs(["0"]) == [] and list(c.search_logged_models(["0"])) == []  # nothing in "Default"
    for run in [search, *trial_runs(c, exp, search.info.run_id)]:
        t = run.data.tags
        assert t["mlflow.source.name"] == "tune/search.py" and t["mlflow.source.type"] == "LOCAL" and t["mlflow.user"]
    digests = set()
    for t in _finished(c, exp, search):
        run = c.get_run(t.info.run_id)
        (out,) = run.outputs.model_outputs  # the UI's Models column: the generator
        model = c.get_logged_model(out.model_id)
        assert model.experiment_id == exp and model.name == "generator" and model.source_run_id == t.info.run_id
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"mnist-bundled/train", "mnist-bundled/heldout", "mnist-bundled/test"}
        assert {x.value for x in inputs["mnist-bundled/train"].tags} == {"training"}
        digests.add(tuple(sorted((n, i.dataset.digest) for n, i in inputs.items())))
    assert len(digests) == 1  # the same splits, the same digests in every trial
    assert {i.dataset.name for i in search.inputs.dataset_inputs} == {"mnist-bundled/train", "mnist-bundled/heldout",
                                                                         "mnist-bundled/test"}
    info = mlflow.models.get_model_info("models:/tldr-generator-mnist-bundled@champion")
    assert info.signature is not None and tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
    clf = mlflow.models.get_model_info("models:/tldr-classifier-mnist-bundled/1")
    assert c.get_logged_model(clf.model_id).experiment_id == exp and clf.signature is not None


@pytest.mark.slow
def test_objective_sorts_first_and_baselines_are_logged_once(smoke):
    runs, _proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    for t in _finished(c, exp, search):
        names = sorted(t.data.metrics)  # the UI's order: plain string order of the names and sections
        assert names[0] == "Objective/quality", names
        assert t.data.metrics["Objective/quality"] == t.data.metrics["eval/quality"]
        assert not any(k.startswith("baseline") for k in names)
    baselines = {k for k in search.data.metrics if k.startswith("baseline/")}
    assert {f"baseline/{b}/quality" for b in ("noise", "class_mean", "heldout_real")} <= baselines
    for k in baselines:
        assert len(c.get_metric_history(search.info.run_id, k)) == 1


@pytest.mark.slow
def test_importances_wait_for_enough_trials(smoke):
    runs, proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    arts = {a.path for a in c.list_artifacts(search.info.run_id, "summary")}
    assert "summary/param_importances.json" not in arts  # 2 trials with a value: no importances
    assert f"parameter importances: not computed (2 trials with a value; they need at least " \
           f"{MIN_IMPORTANCE_TRIALS})" in proc.stdout


def test_importances_are_named_like_the_parameters():
    space = load_space()
    rows = []
    for i in range(MIN_IMPORTANCE_TRIALS):
        params = {"variant": ("label", "vector")[i % 2], "lr": str(1e-3 * (i + 1)), "var": str(1e-4 * (i + 1)),
                  "ce": str(0.5 + i), "kl": "0"}
        rows.append(TrialSummary(f"r{i}", f"t{i}", i + 1, "FINISHED", "finished", 0.1 * i, 1.0, params, 8, True))
    imp = param_importances(rows, space, "quality")
    assert {"var", "ce", "lr", "variant"} <= set(imp) and not any(k.startswith("log10_") for k in imp)
    assert param_importances(rows[:-1], space, "quality") == {}  # one trial short: none


@pytest.mark.slow
def test_a_search_is_recorded_as_the_classifiers_audit(smoke, cache_dir):
    runs, _proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    mv = c.get_model_version("tldr-classifier-mnist-bundled", search.data.tags["tldr.classifier_version"])
    assert mv.tags["audit.status"] == "done" and mv.tags["audit.run_id"] == search.info.run_id
    assert mv.tags["audit.risk"] in ("LOW", "MEDIUM", "HIGH")
    dry = run_search(runs, cache_dir, ["--dry-run"], script=REAUDIT)
    assert dry.returncode == 0, dry.stderr
    # the search's result is on the version, but it judged one attack: the re-audit audits it in full
    assert "1 version(s) to audit, 0 up to date" in dry.stdout and "never audited" not in dry.stdout
    assert "stale audit: audited under rule none" in dry.stdout


@pytest.mark.slow
def test_a_worker_killed_before_its_run_still_gets_one(smoke):
    runs, proc = smoke  # its second trial's worker is killed (SIGKILL) before it opens a run
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    trials = {t.data.tags[tr.TRIAL_NUMBER]: t for t in trial_runs(c, exp, search.info.run_id)}
    assert len(trials) == 4
    killed = trials["2"]
    assert killed.info.status == "FAILED" and killed.data.tags[tr.END] == "failed"
    assert killed.data.tags["tldr.created_by"] == "driver" and killed.data.params["variant"]
    assert trials["1"].data.tags.get("tldr.created_by") != "driver"  # the non-finite trial opened its own
    assert ", 2 failed (of 4)" in proc.stdout
