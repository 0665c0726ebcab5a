"""The search (tldr_core.platform.search.driver, run as tune/search.py): the search space, the settings and
the up-front checks, and real (tiny) Ray Tune searches checked through the MLflow client: one nested
run per trial, statuses, failures, resume, the champion."""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import yaml

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights
from tldr_core.platform.search.settings import log_every_for, make_settings
from tldr_core.platform.search.spaces.load import DEFAULT_SPACE, load_space, space_from_dict
from tldr_core.platform.search.spaces.tldr_space import switch_name
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import trial_runs

from local_servers import free_port
from search_helpers import REPO, SEARCH, TINY, client_of, done_counts, run_search, searches_of  # noqa: E402 - this folder
from cli_process import run_python  # tests/: commands forked from a server that imported torch once


def load_search_module():
    spec = importlib.util.spec_from_file_location("tldr_search_cli", SEARCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------ the space

def test_default_space_covers_exactly_the_nine_weights():
    space = load_space()
    assert tuple(space.weights) == LossWeights.names()
    defaults = LossWeights()
    for name, w in space.weights.items():
        assert w.searched and w.off and w.low <= getattr(defaults, name) <= w.high, name
    assert space.params["variant"].choices == ("label", "vector", "matrix", "vector-matrix")


def test_space_samples_valid_configs_with_conditional_epsilon():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    seen_off = set()
    for _ in range(40):
        trial = study.ask()
        config = space(trial)
        cfg = space.attack_config(config)  # validates through AttackConfig.from_flat
        assert isinstance(cfg, AttackConfig) and config["trial_number"] == trial.number + 1
        perturbed = cfg.weights.kl_pert > 0 or cfg.weights.ce_pert > 0
        assert ("epsilon" in trial.params) == perturbed  # epsilon only where it applies
        seen_off |= {n for n in LossWeights.names() if getattr(cfg.weights, n) == 0}
        assert all(switch_name(n) in trial.params for n in LossWeights.names())
        study.tell(trial, 0.0)
    assert seen_off == set(LossWeights.names())  # every term gets switched off somewhere


def test_initial_points_are_translated_to_optuna_params():
    space = load_space()
    p = space.to_optuna_params({"variant": "label", "ce": 2.0, "cos": 0, "epsilon": 0.1})
    assert p["variant"] == "label" and p["ce"] == 2.0 and p[switch_name("ce")] is True
    assert p[switch_name("cos")] is False and "cos" not in p
    assert "epsilon" in p  # the perturbed terms are not fixed off by the point, so epsilon may apply


def _set(path: str, value):
    def edit(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d.setdefault(k, {})
        if value is _DELETE:
            d.pop(last)
        else:
            d[last] = value
    return edit


_DELETE = object()


def test_defaults_as_initial_point():
    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    data["initial_points"] = ["defaults"]
    space = space_from_dict(data)
    (point,) = space.initial_points
    cfg = space.attack_config(point)
    assert cfg.weights == LossWeights() and cfg.variant == AttackConfig().variant
    params = space.to_optuna_params(point)
    assert all(params[switch_name(n)] is True for n in LossWeights.names())


def test_refinement_space_starts_from_the_defaults():
    space = load_space(REPO / "tune" / "space-refine.yaml")
    (point,) = space.initial_points
    cfg = space.attack_config(point)
    assert cfg.weights == LossWeights() and cfg.variant == AttackConfig().variant
    assert (cfg.lr, cfg.epsilon, cfg.gen_dropout) == (AttackConfig().lr, AttackConfig().epsilon, AttackConfig().gen_dropout)
    for name in LossWeights.names():  # each range holds its default, within a factor of about 3
        spec, default = space.weights[name], getattr(LossWeights(), name)
        assert spec.low < default < spec.high and spec.high / spec.low < 10


BAD_SPACES = {
    "unknown weight": (_set("weights.klx", 1.0), "unknown loss term"),
    "missing weight": (_set("weights.grad", _DELETE), "no entry for ['grad']"),
    "bare off key": (_set("weights.kl", {"low": 0.1, "high": 1, "off": True}), "unknown key"),
    "low above high": (_set("weights.kl", {"low": 2, "high": 1}), "0 < low < high"),
    "bad variant": (_set("params.variant", {"choices": ["label", "pixel"]}), "unknown variant"),
    "reserved key": (_set("fixed.steps", 5), "set by the search command"),
    "unknown section": (_set("weightz", {}), "unknown section"),
    "when_on unknown": (_set("params.epsilon.when_on", ["nope"]), "unknown loss term"),
    "weight in params": (_set("params.kl", {"low": 0.1, "high": 1}), "put them under weights"),
    "initial point word typo": (_set("initial_points", ["default"]), "or the word 'defaults'"),
    "a kkt space": (_set("attack", "kkt"), "this is a kkt search space (attack: kkt), not a tldr one"),
    "bad prior choice": (_set("params.jitter", {"choices": [0, -1]}), "jitter must be an integer >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_invalid_space_is_one_clear_error(case):
    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    edit, message = BAD_SPACES[case]
    edit(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        space_from_dict(data, "test.yaml")


# ------------------------------------------------------------------------------------ up-front checks

def test_help_lists_every_option():
    out = run_python([SEARCH, "--help"], cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--dataset", "--train-size", "--trials", "--max-concurrent", "--cpus-per-trial", "--gpus-per-trial",
                 "--steps", "--address", "--storage", "--tracking-uri", "--experiment", "--classifier", "--resume",
                 "--smoke-test", "--seed", "--data-root", "--download", "--space", "--objective", "--scheduler",
                 "--attack"):
        assert flag in out.stdout, flag


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_search_module()


def _bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("weights: {kl: {low: 1, high: 0.1}}\nparams: [not, a, mapping]\n")
    return p


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["--space", "BAD"], "search space"),
    (["--space", "/nonexistent/space.yaml"], "does not exist"),
    (["--tracking-uri", "http://127.0.0.1:PORT"], "unreachable"),
    (["--address", "127.0.0.1:PORT"], "Ray cluster at 127.0.0.1:"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--classifier", "/nonexistent.pt"], "no such file"),
])
def test_bad_input_is_one_error_before_any_work(cli, tmp_path, capsys, argv, message):
    argv = [a.replace("PORT", str(free_port())).replace("BAD", str(_bad_yaml(tmp_path))) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing was started
    assert not (tmp_path / "runs" / "tune").exists()


def test_scheduler_option(cli):
    from tldr_core.platform.search.cli import settings_from_args

    parse = cli.build_parser().parse_args
    assert settings_from_args(parse([])).scheduler == "asha"
    assert settings_from_args(parse(["--scheduler", "fifo"])).scheduler == "fifo"
    with pytest.raises(SystemExit):
        parse(["--scheduler", "pbt"])


def test_settings_defaults_and_smoke_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    full = make_settings("mnist-bundled", max_concurrent=2)
    assert (full.trials, full.steps, full.per_class, full.train_size, full.classifier_epochs) == (8, 400, 20, 1000, 15)
    assert (full.eval_every, full.log_every, full.eval_per_class) == (100, 25, 10)  # 400 // 4; 25 divides 100
    assert full.tracking_uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert full.storage == str((tmp_path / "runs" / "tune").resolve()) and full.experiment == "tldr-mnist-bundled"
    smoke = make_settings("mnist-bundled", smoke_test=True, steps=30, max_concurrent=1)
    assert (smoke.trials, smoke.steps, smoke.per_class, smoke.train_size) == (2, 30, 4, 200)  # explicit steps win
    assert (smoke.eval_every, smoke.log_every, smoke.eval_per_class) == (7, 7, 4)
    assert [log_every_for(n) for n in (1, 24, 50, 97, 100)] == [1, 24, 25, 1, 25]


def test_settings_are_frozen_and_checked(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    st = make_settings("mnist-bundled", max_concurrent=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.trials = 3
    for change, message in ((dict(trials=0), "--trials must be >= 1, got 0"), (dict(tau=1.5), "--tau must be in (0, 1]"),
                            (dict(objective="speed"), "--objective must be one of"),
                            (dict(dataset="imagenet"), "unknown data set 'imagenet'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            dataclasses.replace(st, **change)
    # the settings round-trip through the JSON the search stores for --resume
    assert type(st)(**dataclasses.asdict(st)) == st


def test_run_checks_before_any_work(tmp_path, monkeypatch):
    from tldr_core.platform.search.driver import run

    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))
    st = make_settings("mnist-bundled", max_concurrent=1, tracking_uri=f"http://127.0.0.1:{free_port()}")
    said = []
    with pytest.raises(tr.TrackingError, match="unreachable"):
        run(st, said.append)
    assert said == [] and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ real searches

@pytest.mark.slow
def test_smoke_search_records_every_trial(smoke):
    runs, proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    assert search.info.status == "FINISHED" and search.data.tags[tr.STATE] == "finished"
    trials = trial_runs(c, exp, search.info.run_id)
    assert len(trials) == 4  # one nested run per trial, the killed worker's included
    assert len({t.data.tags[tr.TRIAL_ID] for t in trials}) == 4
    terms = set(LossWeights.names()) | {"bn"}  # the nine terms and the BatchNorm prior's
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == search.info.run_id
        assert terms | {"variant"} <= set(t.data.params)
        # early-stopped trials end FINISHED, as Ray's own MLflow callback ends them; KILLED = interrupted only
        assert t.info.status in ("FINISHED", "FAILED")
        assert t.data.tags[tr.STATE] == t.data.tags[tr.END]
        assert t.data.tags[tr.END] in (("finished", "early-stopped") if t.info.status == "FINISHED" else ("failed",))
        if t.info.status != "FAILED":
            m = t.data.metrics
            assert {"eval/quality", "eval/label_agreement", "Objective/quality"} <= set(m)
            # the intermediate reports score exposure too (pipeline.score_images), so ASHA can rank on it
            assert {"eval/exposure_tpr", "eval/exposure_auc"} <= set(m)
            assert 2 in {h.step for h in c.get_metric_history(t.info.run_id, "eval/exposure_auc")}
            assert "loss/total" in m and {k.split("/")[1] for k in m if k.startswith("loss/")} - {"total"} <= terms
            assert {k.split("/")[1] for k in m if k.startswith("wloss/")} <= terms and any(k.startswith("wloss/") for k in m)
            assert not any(k.startswith(("baseline", "loss_", "wloss_")) or "/" not in k for k in m), sorted(m)
    finished = [t for t in trials if t.data.tags[tr.END] == "finished"]
    assert finished
    for t in finished:
        arts = {a.path for a in c.list_artifacts(t.info.run_id)}
        assert {"grid.png", "nearest.png"} <= arts
        assert len(c.get_metric_history(t.info.run_id, "eval/quality")) >= 2  # over steps, not only the end
    # the parent's summary, its baselines (logged once, there) and the registry
    summary = {a.path for a in c.list_artifacts(search.info.run_id, "summary")}
    assert {"summary/objective_vs_trial.png", "summary/trials.json", "summary/baselines.json"} <= summary
    pm = search.data.metrics
    assert {"baseline/noise/quality", "baseline/class_mean/exposure_auc", "classifier/test_accuracy"} <= set(pm)
    assert pm["best/quality"] == pm["Objective/quality"] == max(t.data.metrics["eval/quality"] for t in finished)
    best = max(finished, key=lambda t: t.data.metrics["eval/quality"])
    assert search.data.tags["tldr.best_run"] == best.info.run_id
    mv = c.get_model_version_by_alias("tldr-generator-mnist-bundled", "champion")
    assert mv.run_id == best.info.run_id and mv.tags["objective"] == "quality"
    assert mv.tags["classifier_version"] == search.data.tags["tldr.classifier_version"]
    clf = c.get_model_version("tldr-classifier-mnist-bundled", search.data.tags["tldr.classifier_version"])
    assert 0 <= float(clf.tags["test_accuracy"]) <= 1
    # progress lines and where to look
    assert "finished: quality" in proc.stdout and "best so far" in proc.stdout
    assert "open the UI" in proc.stdout and search.info.run_id in proc.stdout


@pytest.mark.slow
def test_failing_trial_does_not_stop_the_search(smoke):
    runs, proc = smoke
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    trials = trial_runs(c, exp, search.info.run_id)
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert len(failed) == 2  # this one and the killed worker's (test_search_mlflow.py)
    (f,) = [t for t in failed if t.data.tags[tr.TRIAL_NUMBER] == "1"]
    assert float(f.data.params["ce"]) == 1e308
    assert "NonFiniteLossError" in f.data.tags[tr.ERROR]
    assert "error.txt" in {a.path for a in c.list_artifacts(f.info.run_id)}
    assert "trial 1 FAILED" in proc.stdout
    assert len(trials) - len(failed) == 2  # the other trials still ran


@pytest.mark.slow
def test_interrupted_between_and_mid_trial_then_resumed(tmp_path, cache_dir):
    """Ctrl-C after a trial ended, `--resume` and Ctrl-C again with a trial mid-way, `--resume` to the end:
    true end states and counts at each stop, the same search run and no duplicated trial runs at the end.
    One search interrupted twice (three processes, ~30 s each) covers both interruptions; FIFO, so nothing
    stops early and a trial Ray marks TERMINATED by the Ctrl-C cannot pass for one stopped by ASHA."""
    runs = tmp_path / "runs"
    args = [*TINY, "--max-concurrent", "1", "--scheduler", "fifo"]
    first = run_search(runs, cache_dir, args, {"TLDR_SEARCH_INTERRUPT_AFTER": "1"})  # Ctrl-C after one trial
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    assert "--resume" in first.stdout
    c, exp = client_of(runs)
    (search,) = searches_of(c, exp)
    assert search.info.status == "KILLED"
    before = {t.data.tags[tr.TRIAL_ID]: t for t in trial_runs(c, exp, search.info.run_id)}
    done_before = {k: t.info.run_id for k, t in before.items() if t.data.tags[tr.STATE] != "interrupted"}
    assert len(done_before) == 1 and all(t.info.status != "RUNNING" for t in before.values())
    assert ": 1 of 3 trials done" in first.stdout  # what really ended, not what Ray marked TERMINATED

    # resumed, then Ctrl-C right after its first intermediate report: a trial is mid-way
    second = run_search(runs, cache_dir, ["--resume"], {"TLDR_SEARCH_INTERRUPT_AFTER_RESULTS": "1"})
    assert second.returncode == 130, second.stdout[-3000:] + second.stderr[-3000:]
    (search,) = searches_of(c, exp)
    mid = trial_runs(c, exp, search.info.run_id)
    assert len(mid) >= 2  # every trial Ray started has a run
    ended = [t for t in mid if t.data.tags[tr.END] in ("finished", "early-stopped", "failed")]
    interrupted = [t for t in mid if t.data.tags[tr.END] == "interrupted"]
    assert len(ended) + len(interrupted) == len(mid) and interrupted
    assert all(t.info.status == "KILLED" for t in interrupted)
    assert not any(t.data.tags[tr.END] == "early-stopped" for t in mid)  # fifo: nothing stops early
    (line,) = re.findall(r"interrupted after \d+s: (\d+) of 3 trials done", second.stdout)
    assert int(line) == len(ended)

    third = run_search(runs, cache_dir, ["--resume"])
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    (search,) = searches_of(c, exp)  # the same search run, not a new one
    assert search.info.status == "FINISHED"
    after = trial_runs(c, exp, search.info.run_id)
    ids = [t.data.tags[tr.TRIAL_ID] for t in after]
    assert len(after) == 3 and len(set(ids)) == 3  # no duplicated trial runs
    for trial_id, run_id in done_before.items():  # the finished trial kept its run
        assert {t.data.tags[tr.TRIAL_ID]: t.info.run_id for t in after}[trial_id] == run_id
    assert {t.data.tags[tr.END] for t in after} == {"finished"} and {t.info.status for t in after} == {"FINISHED"}
    assert all(k <= m == 3 for k, m in done_counts(first.stdout + second.stdout + third.stdout))  # never "5/3"
    assert "3 finished, 0 stopped early by ASHA, 0 failed (of 3)" in third.stdout
    assert c.get_model_version_by_alias("tldr-generator-mnist-bundled", "champion").run_id in {t.info.run_id for t in after}
