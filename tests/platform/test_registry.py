"""Model registry: the audited classifier, generator versions and the `champion` alias (no Ray needed).

Searches are simulated with the same MLflow calls the search makes (tldr_core.platform.tracking.store), so the
promotion rule is tested on its own: a challenger gets the alias only if it beats the champion for
the same classifier on the same objective.
"""
from __future__ import annotations

import math

import pytest
import torch

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, GENERATOR_FORMAT, save_checkpoint
from tldr_core.attack.config import LossWeights
from tldr_core.attack.models import ConditionedGenerator, PaperCNN
from tldr_core.platform.registry import models as rg
from tldr_core.platform.registry.champion import CHAMPION
from tldr_core.platform.registry.cli import main as registry_main
from tldr_core.platform.registry.names import generator_model_name
from tldr_core.platform.registry.promotion import promote
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import TrialRun

pytestmark = pytest.mark.slow  # an MLflow database and model logging: seconds, not milliseconds

DATASET = "toy-digits"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = tr.client(uri)
    exp = tr.ensure_experiment(c, "tldr-registry-test", root / "mlartifacts")
    torch.manual_seed(0)
    clf = PaperCNN((1, 12, 12), 3, width=4, hidden=8).eval()
    clf_path = save_checkpoint(root / "clf.pt", clf, CLASSIFIER_FORMAT, {"test_accuracy": 0.9})
    clf2_path = save_checkpoint(root / "clf2.pt", PaperCNN((1, 12, 12), 3, width=4, hidden=8).eval(),
                                CLASSIFIER_FORMAT, {"test_accuracy": 0.8})
    gen_path = save_checkpoint(root / "gen.pt", ConditionedGenerator("label", 3, (1, 12, 12), 8, 0.1, width=8),
                               GENERATOR_FORMAT, {"dataset": DATASET})
    return {"c": c, "exp": exp, "root": root, "uri": uri, "clf": clf_path, "clf2": clf2_path, "gen": gen_path}


def fake_search(store, values, *, objective="quality", clf_path=None, failed=0, killed=0) -> str:
    """A search run with one FINISHED trial run per value (each with a logged generator)."""
    c, exp = store["c"], store["exp"]
    clf_path = clf_path or store["clf"]
    parent = c.create_run(exp, tags={tr.ROLE: "search", tr.OBJECTIVE: objective, "tldr.dataset": DATASET}).info.run_id
    ref = rg.register_classifier(c, parent, clf_path, DATASET, {"test_accuracy": 0.9})
    tr.set_tags(c, parent, {"tldr.classifier_name": ref.name, "tldr.classifier_version": ref.version,
                            "tldr.classifier_sha256": ref.sha256})
    n = 0
    for v in values:
        n += 1
        run = TrialRun.start(c, exp, parent, f"t{n}", n, f"trial-{n}")
        run.log_params({**LossWeights().as_dict(), "variant": "label"})
        run.log_metrics({f"eval/{objective}": v, "eval/label_agreement": 1.0}, step=10)
        info = rg.log_checkpoint_model(c, run.run_id, store["gen"], "generator")
        run.set_tags({tr.GENERATOR_MODEL: info.model_uri, tr.GENERATOR_MODEL_ID: info.model_id or ""})
        run.end("FINISHED", "finished")
    for _ in range(failed):
        n += 1
        run = TrialRun.start(c, exp, parent, f"t{n}", n, f"trial-{n}")
        run.fail(FloatingPointError("loss became non-finite"))
    for _ in range(killed):  # an early-stopped trial with a better intermediate value: never promoted
        n += 1
        run = TrialRun.start(c, exp, parent, f"t{n}", n, f"trial-{n}")
        run.log_metrics({f"eval/{objective}": 0.99}, step=2)
        run.end("FINISHED", "early-stopped")  # as the search ends them: FINISHED, tldr.end=early-stopped
    c.set_terminated(parent, "FINISHED")
    return parent


def champion(store):
    return store["c"].get_model_version_by_alias(generator_model_name(DATASET), CHAMPION)


def test_promotion_keeps_the_champion_against_a_worse_challenger(store):
    c = store["c"]
    first = fake_search(store, [0.20, 0.30], failed=1, killed=1)
    res = promote(c, first, log=None)
    assert res.promoted and res.version == "1"
    mv = champion(store)
    assert str(mv.version) == "1"
    assert math.isclose(float(mv.tags["objective_value"]), 0.30)  # the best *finished* trial, not the killed 0.99
    assert mv.tags["objective"] == "quality" and mv.tags["search_run"] == first
    assert mv.tags["classifier_name"] == rg.classifier_model_name(DATASET) and mv.tags["classifier_version"] == "1"

    worse = fake_search(store, [0.25])
    res = promote(c, worse, log=None)
    assert not res.promoted and res.version == "2"
    assert "does not beat" in res.reason and "0.2500 <= 0.3000" in res.reason
    assert str(champion(store).version) == "1"  # the alias did not move
    v2 = c.get_model_version(generator_model_name(DATASET), "2")
    assert "does not beat" in v2.tags["promotion"]
    assert c.get_run(worse).data.tags["tldr.champion"] == "false"

    # promotion is idempotent for a search: no second version for the same trial
    again = promote(c, worse, log=None)
    assert again.version == "2" and not again.promoted

    better = fake_search(store, [0.31, 0.1])
    res = promote(c, better, log=None)
    assert res.promoted and "0.3100 > 0.3000" in res.reason
    assert str(champion(store).version) == res.version == "3"


def test_champion_is_compared_per_classifier_and_objective(store):
    c = store["c"]
    base = promote(c, fake_search(store, [0.5]), log=None)  # quality 0.5 for classifier 1
    other_clf = promote(c, fake_search(store, [0.05], clf_path=store["clf2"]), log=None)
    assert other_clf.promoted, other_clf.reason  # nothing comparable for the new classifier
    assert "replacing version" in other_clf.reason
    other_obj = promote(c, fake_search(store, [0.01], objective="coverage"), log=None)
    assert other_obj.promoted, other_obj.reason  # nothing comparable for the objective either
    back = promote(c, fake_search(store, [0.45]), log=None)
    assert not back.promoted and f"version {base.version}" in back.reason  # compared with classifier 1's best


def test_promotion_without_a_finished_trial(store):
    res = promote(store["c"], fake_search(store, [], failed=1, killed=1), log=None)
    assert res.version is None and not res.promoted and "no trial" in res.reason


def test_registered_models_load_weights_only(store, tmp_path):
    c = store["c"]
    parent = fake_search(store, [0.9])
    promote(c, parent, log=None)
    gen, meta, mv = rg.load_registered_generator(c, f"models:/{generator_model_name(DATASET)}@champion", tmp_path)
    assert isinstance(gen, ConditionedGenerator) and meta["dataset"] == DATASET
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{generator_model_name(DATASET)}/{mv.version}")
    # the model has a signature: columns label/per_class/seed, so a dict input is one table (a scalar seed)
    images = model.predict({"label": [0, 1, 2], "seed": 1})
    assert images.shape == (3, 1, 12, 12) and images.min() >= 0 and images.max() <= 1

    clf, cmeta, ref, path = rg.load_registered_classifier(c, f"models:/{rg.classifier_model_name(DATASET)}/1",
                                                          tmp_path / "clf")
    assert isinstance(clf, PaperCNN) and ref.sha256 == rg.sha256_file(store["clf"])
    assert not any(p.requires_grad for p in clf.parameters())


def test_classifier_registration_is_deduplicated(store):
    c = store["c"]
    name = rg.classifier_model_name(DATASET)
    before = len(c.search_model_versions(f"name = '{name}'"))
    fake_search(store, [])
    fake_search(store, [], clf_path=store["clf2"])
    assert len(c.search_model_versions(f"name = '{name}'")) == before  # both files are registered already
    mv = c.get_model_version(name, "1")
    assert mv.tags["sha256"] == rg.sha256_file(store["clf"]) and mv.tags["test_accuracy"] == "0.9"


def test_registry_uri_errors(store):
    with pytest.raises(rg.RegistryError, match="not a registry URI"):
        rg.parse_models_uri("runs:/abc/model")
    with pytest.raises(rg.RegistryError, match="no such registered model"):
        rg.resolve_version(store["c"], "models:/tldr-classifier-nope@champion")


def test_promote_cli(store, capsys):
    parent = fake_search(store, [0.0001])
    assert registry_main(["--tracking-uri", store["uri"], "promote", "--search-run", parent]) == 0
    out = capsys.readouterr().out
    assert "not promoted" in out
    assert registry_main(["--tracking-uri", store["uri"], "promote", "--search-run", "0" * 32]) == 2
    assert registry_main(["--tracking-uri", store["uri"], "show", "--dataset", DATASET]) == 0
    assert "@champion" in capsys.readouterr().out
