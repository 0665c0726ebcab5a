"""The audit report: risk levels, a self-contained page, and that it renders in real headless Chromium
with every image loaded and no console errors (CI installs Chromium; a missing one fails, never skips)."""
import json
import re
from html import escape
import sys
from pathlib import Path

import pytest
import torch

from tldr_core.attack import templates
from tldr_core.attack.classifier import ClassifierSettings, train_classifier
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.data import load_dataset
from tldr_core.attack.output import AttackOutput
from tldr_core.cli import audit
from tldr_core.attack.kkt import KKTConfig
from tldr_core.report.page import headline, render_report, reproduce_command, verdict_sentence, write_report
from tldr_core.scoring import exposure, exposure_score, metrics, nearest, pipeline, ssim
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.pipeline import heldout_nearest, score_attack, template_attack
from tldr_core.scoring.risk import MEANING, Risk, assess

sys.path.insert(0, str(Path(__file__).parent))
from browser_check import INSTALL, check_page, find_chromium  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_headline_says_what_leaked():
    assert headline(Risk("HIGH", ["x"], criterion="exposure")) == MEANING["HIGH"]
    assert "individual training images can be reconstructed" in headline(Risk("HIGH", ["x"], criterion="matches"))
    assert "no individual training image" in headline(Risk("MEDIUM", ["x"], criterion="gap_significant"))
    assert "statistics specific to its training set" in headline(Risk("MEDIUM", ["x"], criterion="raw_exposure"))
    assert headline(Risk("LOW", ["x"])) == MEANING["LOW"]


def test_verdict_sentence_names_the_level_its_meaning_and_the_evidence():
    r = Risk("HIGH", ["calibrated exposure: 40% of the training images above the threshold"], criterion="exposure")
    assert verdict_sentence("generator", r) == (
        "HIGH: individual training images can be reconstructed from this model. With the generator reconstructions: "
        "calibrated exposure: 40% of the training images above the threshold.")
    assert verdict_sentence("KKT", Risk("LOW", ["no closer"])).startswith("LOW: nothing recovered from this model")


@pytest.fixture(scope="module")
def leaky_case():
    """digits-8x8 with a linear model; 'reconstructions' that are noisy copies of training images (a leak)."""
    torch.manual_seed(0)
    b = load_dataset("digits-8x8", 100, seed=0, test_size=200)
    model, meta = train_classifier(b, ClassifierSettings(arch="mlp", hidden=0, dropout=0.0, optimizer="sgd", lr=0.05,
                                                         epochs=20), log=lambda s: None)
    idx = torch.cat([(b.train.labels == c).nonzero().flatten()[:3] for c in range(10)])
    images = (b.train.images[idx] + 0.05 * torch.randn(len(idx), 1, 8, 8)).clamp(0, 1)
    labels = b.train.labels[idx]
    attack = score_attack(AttackOutput("tldr", images, labels), model, b)
    baselines = score_baselines(b.train, b.heldout, b.test, 10, 3, classifier=model)
    record = {"dataset": {"name": b.name, "train_size": 100}, "settings": {"variant": "label", "per_class": 3},
              "classifier": {**meta, "path": "model.pt"}, "metrics": attack.metrics}
    results = dict(attack=attack, templates=template_attack(model, b), heldout=heldout_nearest(b, 3),
                   spec=model.spec(), record=record)
    return b, baselines, results


def test_report_computes_nothing(leaky_case, monkeypatch):
    """Rendering draws given results: no SSIM, no search, no attack, no baseline runs while it builds the page."""
    b, baselines, results = leaky_case

    def forbidden(*a, **k):
        raise AssertionError("the report computed something")

    for mod, name in ((ssim, "ssim_matrix"), (nearest, "ssim_matrix"), (metrics, "ssim_matrix"),
                      (metrics, "score_reconstructions"), (metrics, "baseline_sets"), (templates, "weight_templates"),
                      (nearest.ReferenceIndex, "nearest"), (exposure, "ssim_matrix"), (exposure_score, "score_exposure"),
                      (pipeline, "ssim_matrix"), (pipeline, "exposure_gallery")):
        monkeypatch.setattr(mod, name, forbidden)
    html = render_report(b, baselines, **results)
    assert "HIGH risk" in html and "Weight templates" in html and "unseen image" in html
    assert "Exposure: which training images come back" in html


def test_report_states_each_attacks_exposure_and_shows_its_gallery(leaky_case):
    b, baselines, results = leaky_case
    html = render_report(b, baselines, **results)
    section = html[html.index("<h2>Exposure: which training images"):html.index("<h2>Generator reconstructions")]
    assert "Calibrated exposure</b> e_cal(t): how much closer" in section  # the one-line explanation
    for attack in (results["attack"], results["templates"]):
        m = attack.metrics
        for needle in (f"<td>{m['exposure_auc']:.3f}</td><td>{m['exposure_auc_lo']:.3f} &ndash; "
                       f"{m['exposure_auc_hi']:.3f}</td><td>0.5</td>",
                       f"<td>{m['exposure_tpr']:.1%}</td><td>{m['exposure_tpr_lo']:.1%} &ndash; "
                       f"{m['exposure_tpr_hi']:.1%}</td><td>1%</td>",
                       f"{m['exposed_count']:.0f} of {len(b.train)} (e_cal(t) &gt; {m['exposure_threshold']:.3f}); "
                       f"{m['exposed_distinct']:.0f} with a reconstruction of their own",
                       f"about {m['exposed_by_chance']:.3g} expected by chance",
                       f"<td>{m['raw_exposure_tpr']:.1%}</td><td>{m['raw_exposure_tpr_lo']:.1%} &ndash; ",
                       f"SSIM &ge; 0.4</th><td>{m['matched_train_040']:.0f} training images</td><td>Fisher p = "
                       f"{m['matched_p_040']:.2g}</td><td>{m['matched_heldout_040']:.0f} unseen images",
                       f"SSIM &ge; 0.6</th><td>{m['matched_train_060']:.0f} training images</td><td>Fisher p = "
                       f"{m['matched_p_060']:.2g}</td><td>{m['matched_heldout_060']:.0f} unseen images"):
            assert needle in section, needle
    # noisy copies of 30 training images: 30 exposed, and the gallery is embedded once per attack
    assert results["attack"].metrics["exposed_count"] >= 25
    assert section.count('<img class="wide" src="data:image/png;base64,') == 2
    assert "the most exposed training images" in section
    # the verdict box names the exposure criterion in a sentence that reads
    r = assess(results["attack"].metrics, baselines)
    sentence = f"HIGH: {r.meaning}. With the generator (label, 0 steps) reconstructions: {r.reason}."
    assert r.criterion == "exposure" and escape(sentence) in html


def test_report_is_self_contained_and_says_high_risk_for_copied_training_images(leaky_case, tmp_path):
    b, baselines, results = leaky_case
    html = render_report(b, baselines, **results)
    assert html.startswith("<!DOCTYPE html>") and "HIGH risk" in html
    for needle in ("Reconstructions against baselines", "Weight templates", "nearest training", "unseen image",
                   "How the risk level is decided", "settings that reproduce this", "baseline: class-mean image of T",
                   "digits-8x8", "test accuracy"):
        assert needle in html, needle
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) > 50 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(href|src)=[\"'](https?:|//)", html)  # nothing fetched from the network
    path = write_report(tmp_path / "r" / "report.html", html_text=html)
    assert path.read_text() == html


def test_report_renders_in_headless_chromium_with_all_images_and_no_errors(leaky_case, tmp_path):
    b, baselines, results = leaky_case
    try:
        find_chromium()
    except RuntimeError:
        pytest.fail(f"Chromium is needed for this test; install it with: {INSTALL}")
    path = write_report(tmp_path / "report.html", b, baselines, **results)
    res = check_page(path, screenshot=tmp_path / "report.png")
    assert res["errors"] == [] and res["bad_images"] == []
    assert len(res["images"]) > 50 and res["title"].startswith("TLDR audit")
    assert res["screenshot"].stat().st_size > 10_000
    # the check itself catches what it must: a broken image, a missing file, console errors
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="data:image/png;base64,AAAA"><img src="missing.png">'
                   '<script>console.error("boom"); nope();</script></body></html>')
    res = check_page(bad)
    assert len(res["bad_images"]) == 2
    assert any("boom" in e for e in res["errors"]) and any("nope" in e for e in res["errors"])


@pytest.mark.slow
def test_audit_of_a_fully_connected_model_writes_a_report_with_templates(tmp_path, tmp_cache, capsys):
    out = tmp_path / "audit"
    code = audit.main(["--dataset", "digits-8x8", "--train-size", "100", "--arch", "mlp", "--classifier-epochs", "3",
                       "--steps", "3", "--per-class", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out),
                       "--membership-refs", "0"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(audit.OUTPUT_FILES)
    record = json.loads((out / "metrics.json").read_text())
    t = record["template_attack"]
    assert t["method"] == "linear-path" and t["n_recon"] == 10 and 0 <= t["label_agreement"] <= 1
    html = (out / "report.html").read_text()
    assert "Weight templates" in html and "risk:" in html and "--arch mlp" in html
    res = check_page(out / "report.html", screenshot=tmp_path / "audit.png")
    assert res["errors"] == [] and res["bad_images"] == []


def test_reproduce_command_uses_flags_or_the_classifier_file():
    d = AttackConfig()
    rec = {"dataset": {"name": "mnist-bundled", "train_size": 1000},
           "classifier": {"settings": {**ClassifierSettings().__dict__}, "path": "c.pt"},
           "settings": {**d.flat(), "steps": d.steps + 7, "grad": d.weights.grad * 2 + 1, "latent_dim": 17},
           "metrics": {"tau": 0.5}}
    cmd = reproduce_command(rec)
    assert "--arch cnn" in cmd and f"--steps {d.steps + 7}" in cmd and f"--grad {d.weights.grad * 2 + 1:g}" in cmd
    assert "--classifier " not in cmd and "--device" not in cmd and "latent_dim: 17" in cmd
    assert f"--kl-pert {d.weights.kl_pert:g}" in cmd  # every weight, always: defaults may change
    rec["classifier"]["settings"]["optimizer"] = "sgd"  # not expressible by audit flags: point at the file
    assert "--classifier c.pt" in reproduce_command(rec)
    rec["settings"].update(bn=0.25, jitter=2, flip=True)  # the image priors have flags now
    cmd = reproduce_command(rec)
    assert "--bn 0.25" in cmd and "--jitter 2" in cmd and "--flip true" in cmd and "extra.yaml" in cmd  # latent_dim


def test_reproduce_command_of_a_kkt_audit_gives_its_kkt_flags():
    st = {**KKTConfig(steps=40, layers="fc", weight_decay_form=False).flat(), "per_class": 10, "device": "cuda"}
    rec = {"dataset": {"name": "digits-8x8", "train_size": 50}, "attack": "kkt",
           "classifier": {"path": "c.pt"}, "settings": st, "metrics": {"tau": 0.5}}
    cmd = reproduce_command(rec)
    assert "--attack kkt" in cmd and "--kkt-steps 40" in cmd and "--kkt-layers fc" in cmd
    assert "--kkt-weight-decay-form false" in cmd and "--kkt-per-class 10" in cmd
    assert "--kkt-lr" not in cmd and "device" not in cmd and "--kl " not in cmd and "--steps" not in cmd
