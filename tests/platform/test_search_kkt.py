"""The search with --attack kkt and the exposure objectives: the KKT search space (parsed and checked
against KKTConfig), the settings and the command line, the TLDR space's image priors, and one real
(tiny) KKT search on digits-8x8 with a fully connected classifier, checked through the MLflow client."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from tldr_core.attack.config import AttackConfig, ConfigError
from tldr_core.attack.kkt import KKTConfig
from tldr_core.platform.search.settings import make_settings
from tldr_core.platform.search.spaces.kkt_space import KKTSearchSpace, kkt_space_from_dict
from tldr_core.platform.search.spaces.load import (DEFAULT_SPACE, DEFAULT_SPACES, fit_to_classifier, load_space,
                                                   space_from_dict)
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import trial_runs
from cli_process import run_python  # tests/: commands forked from a server that imported torch once

REPO = Path(__file__).resolve().parents[2]
SEARCH = REPO / "tune" / "search.py"
KKT_SPACE = DEFAULT_SPACES["kkt"]


def kkt_data() -> dict:
    return yaml.safe_load(KKT_SPACE.read_text())


# ------------------------------------------------------------------------------------ the KKT space

def test_default_kkt_space_is_linked_and_starts_from_the_defaults():
    assert (REPO / "tune" / "kkt.yaml").resolve() == KKT_SPACE.resolve()
    space = load_space(REPO / "tune" / "kkt.yaml", attack="kkt")
    assert isinstance(space, KKTSearchSpace) and set(space.params) <= set(KKTConfig.names())
    assert {"lr", "init_scale", "lambda_min", "alpha", "layers", "prior", "weight_decay_form",
            "lambda_sign"} <= set(space.params)
    defaults = KKTConfig()
    for name, spec in space.params.items():  # every range holds its default
        value = getattr(defaults, name)
        assert value in spec.choices if spec.kind == "categorical" else spec.low <= value <= spec.high, name
    assert space.params["lr"].log and (space.params["lr"].low, space.params["lr"].high) == (1e-3, 1e-1)
    (first,) = space.initial_points
    base = KKTConfig(steps=7, seed=3)
    assert space.attack_config(first, base=base) == base  # trial 1 = KKTConfig's defaults


def test_kkt_space_samples_valid_configs_and_replays_its_first_point():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(attack="kkt")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    seen = set()
    for _ in range(25):
        trial = study.ask()
        config = space(trial)
        cfg = space.attack_config(config, base=KKTConfig(steps=5))
        assert cfg.steps == 5 and config["trial_number"] == trial.number + 1
        assert 1e-3 <= cfg.lr <= 1e-1 and 0 <= cfg.lambda_min <= 0.5
        seen.add(cfg.layers)
        study.tell(trial, 0.0)
    assert seen == {"all", "first", "fc"}
    replay = space(optuna.trial.FixedTrial(space.to_optuna_params(space.initial_points[0])))
    assert space.attack_config(replay) == KKTConfig()


def _edit(path: str, value):
    def edit(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d.setdefault(k, {})
        d[last] = value
    return edit


BAD_KKT = {
    "unknown name": (_edit("params.lrr", {"low": 0.1, "high": 1}), "unknown setting(s) ['lrr']"),
    "untuned name": (_edit("params.seed", {"low": 0, "high": 3, "int": True}), "unknown setting(s) ['seed']"),
    "steps reserved": (_edit("fixed.steps", 10), "set by the search command (--steps)"),
    "low above high": (_edit("params.lr", {"low": 0.1, "high": 0.01, "log": True}), "need low < high"),
    "log from zero": (_edit("params.init_scale", {"low": 0.0, "high": 1.0, "log": True}), "a log range needs low > 0"),
    "negative bound": (_edit("params.lambda_min", {"low": -0.1, "high": 0.5}), "lambda_min must be >= 0"),
    "bad choice": (_edit("params.layers", {"choices": ["all", "conv"]}), "unknown layers 'conv'"),
    "bound vs fixed": (_edit("fixed.lambda_init", 0.1), "lambda_init (0.1) must be >= lambda_min (0.5)"),
    "when_on": (_edit("params.prior", {"low": 0.1, "high": 1, "when_on": ["kl"]}), "no loss terms"),
    "point out of range": (_edit("initial_points", [{"lr": 0.5}]), "initial_points[0]: lr=0.5 is outside"),
    "point not searched": (_edit("initial_points", [{"per_class": 3}]), "not searched parameters"),
    "point bad choice": (_edit("initial_points", [{"layers": "head"}]), "initial_points[0]"),
    "unknown section": (_edit("weightz", {}), "unknown section(s) ['weightz']"),
    "wrong attack key": (_edit("attack", "tldr"), "this is a tldr search space (attack: tldr), not a kkt one"),
}


@pytest.mark.parametrize("case", sorted(BAD_KKT))
def test_invalid_kkt_space_is_one_clear_error(case):
    data = kkt_data()
    edit, message = BAD_KKT[case]
    edit(data)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        kkt_space_from_dict(data, "k.yaml")
    assert str(err.value).startswith("search space k.yaml: ")


def test_spaces_name_the_attack_they_belong_to():
    with pytest.raises(ConfigError, match=re.escape("this is a tldr search space (it has weights:), not a kkt one; "
                                                    "pass --attack tldr")):
        load_space(DEFAULT_SPACE, attack="kkt")
    with pytest.raises(ConfigError, match=re.escape("this is a kkt search space (attack: kkt), not a tldr one")):
        load_space(KKT_SPACE)
    with pytest.raises(ConfigError, match="unknown attack"):
        load_space(attack="pgd")


def test_kkt_space_round_trips_and_reads_mlflow_params():
    space = load_space(attack="kkt")
    again = space_from_dict(space.as_dict(), "copy", attack="kkt")
    assert again.as_dict() == space.as_dict() and again.describe() == space.describe()
    # MLflow hands every param back as a string: importances still see the categorical choices
    values, dists = space.importance_features({"lr": 0.02, "layers": "fc", "weight_decay_form": "False",
                                               "lambda_sign": "free", "alpha": 5000.0})
    assert values["layers"] == "fc" and values["weight_decay_form"] is False and values["lambda_sign"] == "free"
    assert "alpha" not in values  # outside the searched range: left out, not clipped
    assert set(dists) == set(values)


# ------------------------------------------------------------------------------------ TLDR image priors

def test_tldr_space_searches_the_image_priors_with_off_choices():
    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    data["initial_points"] = ["defaults"]
    space = space_from_dict(data)
    assert 0 in space.params["bn"].choices and 0 in space.params["jitter"].choices
    assert set(space.params["flip"].choices) == {False, True}
    (point,) = space.initial_points
    assert (point["bn"], point["jitter"], point["flip"]) == (0.0, 0, False)  # the defaults trial keeps them off
    cfg = space.attack_config(point)
    assert (cfg.bn, cfg.jitter, cfg.flip) == (0.0, 0, False) and cfg == AttackConfig()


def test_bn_is_not_searched_against_a_classifier_without_batchnorm(tiny_cnn):
    from tldr_core.attack.models import FC

    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    data["initial_points"] = ["defaults"]
    space = space_from_dict(data)
    same, note = fit_to_classifier(space, tiny_cnn)  # PaperCNN has BatchNorm: unchanged
    assert same is space and note is None
    fc = FC((1, 12, 12), 3, widths=(8,))
    fitted, note = fit_to_classifier(space, fc)
    assert "bn" not in fitted.params and "bn" in space.params and "no BatchNorm" in note
    assert all("bn" not in p for p in fitted.initial_points) and {"jitter", "flip"} <= set(fitted.params)
    data["params"].pop("bn")
    data["fixed"]["bn"] = 0.1
    with pytest.raises(ConfigError, match="fixed bn > 0 needs a classifier with BatchNorm"):
        fit_to_classifier(space_from_dict(data), fc)
    kkt_space = load_space(attack="kkt")
    assert fit_to_classifier(kkt_space, fc) == (kkt_space, None)


# ------------------------------------------------------------------------------------ settings and CLI

def test_settings_attack_and_exposure_objectives(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    st = make_settings("digits-8x8", attack="kkt", objective="exposure", max_concurrent=1)
    assert st.attack == "kkt" and st.objective == "exposure_tpr"  # the alias is stored as the metric it names
    assert st.space_source == str(KKT_SPACE.resolve()) and st.space["attack"] == "kkt"
    assert make_settings("digits-8x8", objective="exposure_auc", max_concurrent=1).objective == "exposure_auc"
    assert make_settings("digits-8x8", max_concurrent=1).attack == "tldr"
    with pytest.raises(ConfigError, match=re.escape("--attack must be one of tldr, kkt")):
        dataclasses.replace(st, attack="pgd")
    with pytest.raises(ConfigError, match="not a kkt one"):
        make_settings("digits-8x8", attack="kkt", space=DEFAULT_SPACE, max_concurrent=1)
    stored = dataclasses.asdict(st)
    stored.pop("attack")  # settings stored before --attack existed resume as TLDR searches
    assert type(st)(**stored).attack == "tldr"


def test_help_shows_the_attack_and_the_objectives():
    out = run_python([SEARCH, "--help"], cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--attack {tldr,kkt}" in text
    assert "--objective {quality,coverage,gap,exposure,exposure_auc}" in text
    assert "exposure = exposure_tpr" in text and "at 1% FPR" in text


# ------------------------------------------------------------------------------------ a real KKT search

@pytest.fixture(scope="module")
def kkt_search(tmp_path_factory):
    """Two KKT trials (FIFO: both run to the end) of 8 steps on digits-8x8 against a small trained MLP."""
    from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
    from tldr_core.attack.classifier import ClassifierSettings, train_classifier
    from tldr_core.attack.data import load_dataset

    root = tmp_path_factory.mktemp("kkt")
    torch.set_num_threads(1)
    bundle = load_dataset("digits-8x8", 100, seed=0)
    model, meta = train_classifier(bundle, ClassifierSettings(arch="fc", hidden=16, depth=1, epochs=10),
                                   log=lambda s: None)
    save_checkpoint(root / "fc.pt", model, CLASSIFIER_FORMAT, meta)
    env = {**os.environ, "TLDR_RUNS": str(root / "runs"), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--attack", "kkt", "--smoke-test", "--dataset", "digits-8x8", "--train-size", "100", "--classifier",
            str(root / "fc.pt"), "--trials", "2", "--steps", "8", "--objective", "exposure", "--scheduler", "fifo",
            "--max-concurrent", "1"]
    proc = run_python([SEARCH, *args], cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = tr.client(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tldr-digits-8x8").experiment_id
    (search,) = c.search_runs([exp], f"tags.`{tr.ROLE}` = 'search'")
    return c, exp, search, proc


@pytest.mark.slow
def test_kkt_trials_record_exposure_and_their_settings(kkt_search):
    c, exp, search, proc = kkt_search
    assert search.info.status == "FINISHED" and search.data.tags[tr.ATTACK] == "kkt"
    trials = sorted(trial_runs(c, exp, search.info.run_id), key=lambda t: int(t.data.tags[tr.TRIAL_NUMBER]))
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    for t in trials:
        p, m = t.data.params, t.data.metrics
        assert set(KKTConfig.names()) <= set(p) and p["attack"] == "kkt" and t.data.tags[tr.ATTACK] == "kkt"
        assert (p["steps"], p["train_per_class"], p["per_class"]) == ("8", "10", "20")  # 2 x 10 images per class
        assert {"eval/exposure_tpr", "eval/exposure_auc", "eval/exposure_tpr_lo", "eval/exposed_count",
                "eval/quality", "Objective/exposure_tpr"} <= set(m)
        assert 0 <= m["eval/exposure_tpr"] <= 1 and 0 <= m["eval/exposure_auc"] <= 1
        assert {"loss/residual", "loss/prior", "loss/total"} <= set(m) and not any("baseline" in k for k in m)
        # intermediate reports at steps 2, 4, 6 and the final score at 8, exposure included
        assert sorted(h.step for h in c.get_metric_history(t.info.run_id, "eval/exposure_tpr")) == [2, 4, 6, 8]
        assert t.info.run_name.endswith("-kkt")
    first = trials[0].data.params  # trial 1 = KKTConfig's defaults
    for name, value in KKTConfig().flat().items():
        if name in ("lr", "init_scale", "lambda_min", "alpha", "layers", "prior", "weight_decay_form", "lambda_sign"):
            assert first[name] == str(value), name
    assert trials[1].data.params["lr"] != first["lr"]
    assert "objective exposure_tpr" in proc.stdout and "(kkt, layers all, lr 0.01)" in proc.stdout
    assert "baseline/noise/exposure_auc" in search.data.metrics  # the baselines: once, on the search run


@pytest.mark.slow
def test_kkt_candidates_are_an_artifact_and_nothing_is_registered(kkt_search, tmp_path):
    from tldr_core.attack.checkpoints import load_kkt_candidates

    c, exp, search, proc = kkt_search
    best = search.data.tags["tldr.best_run"]
    assert {"kkt.pt", "grid.png", "nearest.png", "reconstructions.npz"} <= {a.path for a in c.list_artifacts(best)}
    cand, meta = load_kkt_candidates(c.download_artifacts(best, "kkt.pt", str(tmp_path)))
    assert cand.x.shape == (200, 1, 8, 8) and cand.spec()["num_classes"] == 10
    assert torch.equal(torch.bincount(cand.labels), torch.full((10,), 20))
    assert meta["attack"]["lr"] > 0 and meta["trial_id"] and 0 <= meta["metrics"]["exposure_tpr"] <= 1
    assert search.data.tags["tldr.promotion"].startswith("nothing registered: a kkt search")
    assert best in search.data.tags["tldr.promotion"] and "registry: nothing registered" in proc.stdout
    assert not c.search_registered_models("name = 'tldr-generator-digits-8x8'")


@pytest.mark.slow
def test_kkt_search_logs_the_pooled_row_once(kkt_search, tmp_path):
    """The union of both trials' candidates (2 x 200) scored as one set on the search run: per training
    image the better of the two trials' exposures, H' against the same union; re-scoring it (what the
    re-audit does) gives the logged numbers."""
    import csv

    from tldr_core.attack.checkpoints import load_classifier
    from tldr_core.attack.data import load_dataset
    from tldr_core.platform.search.pooled import (EVALUATED_NPZ, pooled_candidates, pooled_result, read_candidates,
                                                  read_pooled)
    from tldr_core.scoring.risk import LEVELS

    c, exp, search, proc = kkt_search
    sid, m, tags = search.info.run_id, search.data.metrics, search.data.tags
    assert (m["pooled/candidates"], m["pooled/trials"], m["pooled/trials_excluded"]) == (400, 2, 0)
    assert {"pooled/exposure_auc", "pooled/exposure_tpr", "pooled/matched_train_060", "pooled/quality",
            "pooled/seconds"} <= set(m) and len(c.get_metric_history(sid, "pooled/exposure_auc")) == 1
    assert tags["tldr.pooled_risk"] in LEVELS and tags["tldr.pooled_trials"] == "1,2"
    assert "tldr.pooled_error" not in tags
    assert {"pooled/exposure.csv", "pooled/exposure.png", "pooled/reconstructions.npz", "pooled/pooled.json"} <= {
        a.path for a in c.list_artifacts(sid, "pooled")}
    line = next(s for s in proc.stdout.splitlines() if s.startswith("pooled: "))
    assert line.startswith("pooled: 400 candidates of 2 trials (0 stopped early): exposure AUC ")
    assert re.search(rf"verdict {tags['tldr.pooled_risk']} \(\w+\); \d+\.\d s$", line), line
    # per training image: the better of the two trials' calibrated exposures (their exposure.csv files)
    def exposures(run_id: str, path: str) -> dict[int, float]:
        with open(c.download_artifacts(run_id, path, str(tmp_path / run_id))) as f:
            return {int(r["train_index"]): float(r["exposure"]) for r in csv.DictReader(f)}
    trials = sorted(trial_runs(c, exp, sid), key=lambda t: int(t.data.tags[tr.TRIAL_NUMBER]))
    per_trial = [exposures(t.info.run_id, "exposure.csv") for t in trials]
    pooled = exposures(sid, "pooled/exposure.csv")
    assert sorted(pooled) == list(range(100))
    assert all(pooled[i] == pytest.approx(max(e[i] for e in per_trial), abs=1e-6) for i in pooled)
    for t in trials:  # the candidates a trial stopped at its last evaluation would have left
        x, y, step = read_candidates(c.download_artifacts(t.info.run_id, EVALUATED_NPZ, str(tmp_path / "ev")))
        assert x.shape == (200, 1, 8, 8) and step == 6 and torch.equal(torch.bincount(y), torch.full((10,), 20))
    # the re-audit's way in: the logged union, the same union read again from the trials, re-scored
    logged, used, left = pooled_candidates(c, sid)
    again, _used, _left = pooled_candidates(c, sid, logged=False)
    assert torch.equal(logged.images, again.images) and torch.equal(logged.extra["trial"], again.extra["trial"])
    assert [u.number for u in used] == [1, 2] and [u.state for u in used] == ["finished"] * 2 and not left
    summary = read_pooled(c, sid)
    assert summary["risk"] == tags["tldr.pooled_risk"] and summary["metrics"]["candidates"] == 400
    classifier, _meta = load_classifier(search.data.params["classifier"])
    bundle = load_dataset("digits-8x8", 100, seed=0, test_size=500)  # the smoke test's data
    res = pooled_result(c, sid, classifier, bundle)
    for k in ("exposure_auc", "exposure_tpr", "quality", "gap", "matched_train_060"):
        assert res.metrics[k] == pytest.approx(m[f"pooled/{k}"], abs=1e-9), k
    assert res.risk.level == tags["tldr.pooled_risk"]
