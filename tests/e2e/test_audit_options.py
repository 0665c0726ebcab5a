"""The audit's verdict in metrics.json, --fail-on, --attack kkt with its --kkt-* flags, and the TLDR image
priors (--bn --jitter --flip): real main() runs on digits-8x8 against tiny saved classifiers (seconds each),
and the bad-input paths (no work, exit status 2)."""
from __future__ import annotations

import json
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
from tldr_core.attack.classifier import ClassifierSettings, train_classifier
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.data import load_dataset
from tldr_core.attack.kkt import KKT_FORMAT, KKTConfig
from tldr_core.attack.models import MLP
from tldr_core.cli import audit, audit_parts
from tldr_core.cli.attack_flags import KKT_HELP, KKT_SHARED
from tldr_core.scoring.risk import THRESHOLDS, assess

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = ["--dataset", "digits-8x8", "--train-size", "100", "--device", "cpu",
        "--membership-refs", "0"]  # LiRA on Ray (9 s an audit): tests/e2e/test_audit.py
TLDR_TINY = ["--steps", "3", "--per-class", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """(leaky, raw) checkpoints: a linear model trained on the audit's own T until its weight templates leak
    (MEDIUM: a training-set signal, but one template per class recovers no individual image), and an
    untrained one (LOW)."""
    folder = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(0)
    bundle = load_dataset("digits-8x8", 100, seed=0)  # the split the audit makes with these flags
    model, meta = train_classifier(bundle, ClassifierSettings(arch="mlp", hidden=0, dropout=0.0, optimizer="sgd",
                                                              lr=0.05, epochs=20), log=lambda s: None)
    leaky = save_checkpoint(folder / "leaky.pt", model, CLASSIFIER_FORMAT, meta)
    torch.manual_seed(0)
    raw = save_checkpoint(folder / "raw.pt", MLP((1, 8, 8), 10).eval(), CLASSIFIER_FORMAT)
    return leaky, raw


def _run(argv, capsys):
    code = audit.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_recorded_verdict(record):
    """The verdict fields are the risk rule's, recomputed from the recorded metrics."""
    metrics = {"tldr": record["metrics"], "kkt": record["metrics"], "templates": record.get("template_attack")}
    for kind, r in record["risks"].items():
        want = assess(metrics[kind], record["baselines"])
        assert r == {"risk": want.level, "reasons": want.reasons, "criterion": want.criterion,
                     "thresholds": want.thresholds}, kind
    top = record["risks"][record["risk_attack"]]
    assert {k: record[k] for k in top} == top
    levels = ("LOW", "MEDIUM", "HIGH")
    assert record["risk"] == max((r["risk"] for r in record["risks"].values()), key=levels.index)


@pytest.mark.slow
def test_fail_on_exits_3_only_when_the_verdict_reaches_it_after_writing_everything(classifiers, tmp_path, capsys):
    leaky, raw = classifiers
    out = tmp_path / "low"  # untrained model, priors on: LOW, below --fail-on medium
    code, stdout, err = _run([*TINY, *TLDR_TINY, "--classifier", raw, "--jitter", 1, "--flip", 1, "--out", out,
                              "--fail-on", "medium"], capsys)
    assert code == 0, err
    assert "fail-on" not in err and "risk (tldr): LOW" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(audit.OUTPUT_FILES)
    record = json.loads((out / "metrics.json").read_text())
    assert record["risk"] == "LOW" and record["criterion"] == "none" and record["reasons"]
    assert record["thresholds"] == THRESHOLDS and set(record["risks"]) == {"tldr", "templates"}
    assert record["settings"]["jitter"] == 1 and record["settings"]["flip"] is True and record["settings"]["bn"] == 0
    _check_recorded_verdict(record)

    out = tmp_path / "medium"  # the leaky model's templates: MEDIUM, at --fail-on medium
    code, stdout, err = _run([*TINY, *TLDR_TINY, "--classifier", leaky, "--out", out, "--fail-on", "medium"], capsys)
    assert code == audit_parts.FAIL_STATUS == 3
    assert "fail-on: the verdict MEDIUM is at or above --fail-on medium: exit status 3" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(audit.OUTPUT_FILES)  # everything written first
    record = json.loads((out / "metrics.json").read_text())
    assert record["risk"] == "MEDIUM" and record["risk_attack"] == "templates"
    _check_recorded_verdict(record)
    assert "MEDIUM risk" in (out / "report.html").read_text()
    # the model-free references are judged by the same rule and recorded beside the attacks
    refs = record["references"]
    assert set(refs) == {"class-mean of T", "class-mean of P"} and refs["class-mean of P"]["risk"] == "LOW"
    assert refs["class-mean of T"]["risk"] in ("LOW", "MEDIUM")


@pytest.mark.parametrize("levels,fail_on,status,says", [
    (("LOW", "HIGH"), ["medium"], 0, None),  # a bare level gates the reconstruction axis only
    (("MEDIUM", "LOW"), ["medium"], 3, "the verdict MEDIUM is at or above --fail-on medium"),
    (("MEDIUM", "LOW"), ["high"], 0, None),
    (("HIGH", "LOW"), ["high"], 3, "the verdict HIGH is at or above --fail-on high"),
    (("LOW", "MEDIUM"), ["membership:medium"], 3, "the membership verdict MEDIUM is at or above --fail-on membership:medium"),
    (("HIGH", "MEDIUM"), ["membership:high"], 0, None),
    (("LOW", "HIGH"), ["any:high"], 3, "the membership verdict HIGH is at or above --fail-on any:high"),
    (("LOW", "not run"), ["membership:medium"], 0, None),  # membership skipped: nothing to gate on
    (("HIGH", "HIGH"), [], 0, None)])
def test_fail_on_status_per_axis(monkeypatch, capsys, levels, fail_on, status, says):
    monkeypatch.setattr(audit_parts, "axis_levels", lambda res: dict(zip(("reconstruction", "membership"), levels)))
    assert audit_parts.fail_on_status(None, audit_parts.parse_fail_on(fail_on)) == status
    err = capsys.readouterr().err
    assert (says in err) if says else err == ""


def test_a_bad_fail_on_value_is_one_error_line(tmp_path, capsys):
    for bad in ("low", "membership:low", "privacy:high"):
        assert audit.main(["--fail-on", bad, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --fail-on expects [AXIS:]LEVEL") and bad in err
    assert not (tmp_path / "o").exists()


def test_bad_membership_flags_are_one_error_line(tmp_path, capsys):
    for argv, says in ((["--membership-refs", "1"], "0 (loss and margin only) or >= 2"),
                       (["--membership-refs", "-2"], "0 (loss and margin only) or >= 2"),
                       (["--membership-refs", "1000"], "more than the 256"),
                       (["--ref-set", "epochs"], "NAME=VALUE"),
                       (["--ref-set", "colour=red"], "unknown classifier setting")):
        assert audit.main([*argv, "--out", str(tmp_path / "o")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_kkt_attack_end_to_end_is_scored_written_and_reported_like_tldr(classifiers, tmp_path, capsys):
    _, raw = classifiers
    out = tmp_path / "kkt"
    code, stdout, err = _run([*TINY, "--classifier", raw, "--attack", "kkt", "--kkt-steps", 3, "--kkt-lr", 0.02,
                              "--kkt-log-every", 1, "--seed", 7, "--out", out], capsys)
    assert code == 0, err
    assert "kkt step     3/3" in stdout and "risk (kkt):" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(audit.output_files("kkt"))
    assert "kkt.pt" in audit.output_files("kkt") and "generator.pt" not in audit.output_files("kkt")
    record = json.loads((out / "metrics.json").read_text())
    # train-size 100 over 10 classes: the attacker's default is 2 x 10 candidates per class; --seed reaches KKT
    assert record["attack"] == "kkt" and record["kkt"]["steps"] == 3
    assert record["settings"] == {**KKTConfig(steps=3, lr=0.02, log_every=1, seed=7, device="cpu").flat(),
                                  "per_class": 20}
    assert set(record["risks"]) == {"kkt", "templates"} and "exposure_auc" in record["metrics"]
    _check_recorded_verdict(record)
    rec = np.load(out / "reconstructions.npz")
    assert rec["images"].shape == (200, 1, 8, 8) and np.bincount(rec["labels"]).tolist() == [20] * 10
    ckpt = torch.load(out / "kkt.pt", weights_only=True)  # the candidates are the reconstructions
    assert ckpt["format"] == KKT_FORMAT and ckpt["meta"]["attack"] == record["settings"]
    assert np.array_equal(ckpt["state_dict"]["x"].clamp(0, 1).numpy(), rec["images"])
    assert len((out / "exposure.csv").read_text().splitlines()) == 1 + 100  # header + every training image
    html = (out / "report.html").read_text()
    assert "KKT candidates (3 steps)" in html and "--attack kkt" in html and "--kkt-steps 3" in html


def _args(argv):
    return audit.build_parser().parse_args(argv)


def test_every_kkt_setting_has_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        audit.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    for f in fields(KKTConfig):
        flag = "--kkt-" + f.name.replace("_", "-")
        assert (flag in text) == (f.name not in KKT_SHARED), flag
        assert f.name in KKT_HELP or f.name in KKT_SHARED, f"{f.name}: describe it in attack_flags.KKT_HELP"
    for flag in ("--attack {tldr,kkt}", "--fail-on [AXIS:]LEVEL", "--membership-refs K", "--bn W", "--jitter PIXELS", "--flip {0,1}",
                 "training set's size"):
        assert flag in " ".join(text.split()), flag


def test_kkt_flags_build_the_kkt_config():
    cfg = audit.config_from_args(_args(["--attack", "kkt", "--kkt-layers", "fc", "--kkt-weight-decay-form", "false",
                                        "--kkt-per-class", "3", "--kkt-alpha", "20", "--seed", "4"]))
    assert cfg == KKTConfig(layers="fc", weight_decay_form=False, per_class=3, alpha=20.0, seed=4, device="auto")
    cfg = audit.config_from_args(_args(["--attack", "kkt", "--seed", "4", "--kkt-seed", "9", "--device", "cpu"]))
    assert cfg.seed == 9 and cfg.device == "cpu"  # --kkt-seed wins over --seed
    assert audit.config_from_args(_args(["--attack", "kkt", "--smoke-test"])).steps == 20


def test_prior_flags_build_the_attack_config():
    assert audit.config_from_args(_args([])) == AttackConfig()  # off by default
    cfg = audit.config_from_args(_args(["--bn", "0.5", "--jitter", "2", "--flip", "1"]))
    assert (cfg.bn, cfg.jitter, cfg.flip) == (0.5, 2, True) and cfg.term_weights()["bn"] == 0.5
    assert audit.config_from_args(_args(["--flip", "false"])).flip is False


@pytest.mark.parametrize("argv,needle", [
    (["--kkt-steps", "3"], "--kkt-steps: only used with --attack kkt"),
    (["--attack", "kkt", "--steps", "3", "--kl", "2"], "--steps, --kl: TLDR setting(s), not used by --attack kkt"),
    (["--attack", "kkt", "--kkt-steps", "0"], "kkt: steps must be an integer >= 1"),
    (["--attack", "kkt", "--kkt-lambda-min", "2"], "lambda_init (1.0) must be >= lambda_min (2.0)"),
    (["--bn", "-1"], "bn must be a finite number >= 0"),
    (["--jitter", "-1"], "jitter must be an integer >= 0"),
])
def test_bad_attack_settings_are_one_clear_error_before_any_work(tmp_path, capsys, argv, needle):
    code, _, err = _run([*argv, "--out", tmp_path / "o"], capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--attack", "kkt", "--kkt-weight-decay-form", "maybe"], "--kkt-weight-decay-form: expected true/false"),
    (["--attack", "kkt", "--kkt-layers", "conv"], "--kkt-layers: invalid choice: 'conv'"),
    (["--attack", "kkt", "--kkt-steps", "1.5"], "--kkt-steps: invalid int value: '1.5'"),
    (["--attack", "gradient"], "--attack: invalid choice: 'gradient'"),
    (["--flip", "2"], "--flip: expected true/false"),
])
def test_malformed_attack_flags_are_argparse_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        audit.main([*argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,epochs", [(["--smoke-test"], 2), (["--smoke-test", "--classifier-epochs", "3"], 3),
                                         ([], 15), (["--classifier-epochs", "7"], 7)])
def test_smoke_test_never_replaces_an_explicit_classifier_epochs(monkeypatch, argv, epochs):
    seen = {}

    def fake(bundle, settings, **kw):
        seen["epochs"] = settings.epochs
        return torch.nn.Identity(), {}, "p"

    monkeypatch.setattr(audit_parts, "load_or_train", fake)
    args = audit.build_parser().parse_args(argv)
    audit_parts.load_audited_classifier(args, None, "cpu", lambda s: None)
    assert seen["epochs"] == epochs


def test_kkt_candidate_bound_is_checked_before_any_classifier_is_trained(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(audit_parts, "load_or_train", lambda *a, **k: pytest.fail("trained a classifier"))
    code = audit.main([*TINY, "--attack", "kkt", "--kkt-per-class", "500000", "--out", str(tmp_path / "o")])
    assert code == 2 and "candidates per class" in capsys.readouterr().err
