"""The controls runner: a shrunk leaky and a shrunk clean control through the real pipeline, and the
verdict logic on reconstructions whose leakage is known (exact copies of training images)."""
from __future__ import annotations

import json

import pytest
import torch

from tldr_core.attack.data import load_dataset
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.zoo import CONTROLS
from tldr_core.cli import controls
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.pipeline import score_attack

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_shrunk_leaky_and_clean_controls_end_to_end(tmp_path, tmp_cache):
    out = tmp_path / "controls"
    rc = controls.main(["--smoke-test", "--controls", "leaky-fc,never-saw-t", "--attacks", "templates,kkt",
                        "--kkt-steps", "8", "--kkt-per-class", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "controls.json").read_text())["rows"]
    # templates apply to the fully connected control only; every control has the model-free reference rows
    t, p = "class-mean of T", "class-mean of P"
    assert [(r["control"], r["attack"]) for r in rows] == [("leaky-fc", t), ("leaky-fc", p), ("leaky-fc", "templates"),
                                                           ("leaky-fc", "kkt"), ("never-saw-t", t),
                                                           ("never-saw-t", p), ("never-saw-t", "kkt")]
    levels = ("LOW", "MEDIUM", "HIGH")
    for r in rows:
        assert r["risk"] in levels
        # the control's membership axis on every row: the smoke test runs the margin attack (no references)
        assert r["membership"]["attack"] == "margin" and r["membership"]["risk"] in levels
        assert r["membership"]["metrics"]["mia_margin_auc"] == rows[0]["membership"]["metrics"]["mia_margin_auc"] or \
            r["control"] != rows[0]["control"]
        if r["attack"] == t:  # judged against its bound, not the control's expectation
            assert r["reference"] and r["expected"] == "at most MEDIUM" and r["as_expected"] == (r["risk"] != "HIGH")
        elif r["attack"] == p:
            assert r["reference"] and r["expected"] == "LOW" and r["as_expected"] == (r["risk"] == "LOW")
        else:
            assert not r["reference"] and r["as_expected"] == ((r["risk"] != "LOW") == CONTROLS[r["control"]].leaky)
        assert 0.0 <= r["metrics"]["exposure_tpr"] <= 1.0 and r["classifier"]["train_accuracy"] > 0.5
    csv = (out / "leaky-fc" / "kkt" / "exposure.csv").read_text().splitlines()
    assert csv[0].startswith("train_index") and len(csv) == 1 + 100  # one row per training image
    assert (out / "leaky-fc" / "kkt" / "kkt.pt").exists()
    md = (out / "controls.md").read_text()
    assert md.count("\n| leaky-fc |") == 4 and "| never-saw-t | kkt |" in md and "high_tpr_ci_low" in md
    assert "calibrated TPR@1%FPR [95% CI] | raw TPR@1%FPR [95% CI]" in md and "model-free reference cells" in md
    assert "| membership |" in md and "(margin)" in md
    # re-judged from the saved cells: the same cells, every verdict the rule's on the new scores
    from tldr_core.cli import controls_rescore

    before = json.loads((out / "controls.json").read_text())["rows"]
    assert controls_rescore.main([str(out)]) == 0
    after = json.loads((out / "controls.json").read_text())["rows"]
    assert [(r["control"], r["attack"], r["steps"], r["seconds"]) for r in after] == \
        [(r["control"], r["attack"], r["steps"], r["seconds"]) for r in before]
    assert [r["metrics"]["exposure_auc"] for r in after] == pytest.approx([r["metrics"]["exposure_auc"] for r in before])
    assert all(r["membership"]["risk"] in levels for r in after)
    assert controls_rescore.main([str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("content, says", [
    (None, "controls.json does not exist: give the folder a controls run wrote"),
    ("{not json", "controls.json is not a controls run's table (Expecting property name"),
    ('{"rows": []}', "controls.json is not a controls run's table (no 'meta' with a dataset and 'rows' list)"),
    ('[1, 2]', "controls.json is not a controls run's table"),
])
def test_rescore_of_a_folder_that_is_no_controls_run_is_one_clear_line(tmp_path, capsys, content, says):
    from tldr_core.cli import controls_rescore

    if content is not None:
        (tmp_path / "controls.json").write_text(content)
    assert controls_rescore.main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and says in line, line


def test_exact_copies_of_training_images_are_high_on_a_leaky_control_and_flagged_on_a_clean_one():
    bundle = load_dataset("digits-8x8", 100, seed=0)
    # the "attack" hands back 40 training images exactly: a leak by construction
    pick = torch.arange(0, 100, 100 // 40)[:40]
    out = AttackOutput("copies", bundle.train.images[pick], bundle.train.labels[pick])
    res = score_attack(out, None, bundle, seed=0, n_boot=200)
    baselines = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, 4, seed=0)
    leaky = controls.cell(CONTROLS["leaky-fc"], "copies", res, baselines, {}, torch.empty(0, dtype=torch.long), 1.0)
    assert leaky["risk"] == "HIGH" and leaky["criterion"] == "exposure" and leaky["as_expected"]
    assert res.metrics["exposed_count"] >= 40 and res.metrics["matched_train_060"] == 40
    clean = controls.cell(CONTROLS["never-saw-t"], "copies", res, baselines, {}, torch.empty(0, dtype=torch.long), 1.0)
    assert clean["risk"] == "HIGH" and not clean["as_expected"]  # a false positive would be shown as one
    # canaries: the first two training images were copied, so they are exposed (e = 1) and ranked first
    stats = controls.canary_stats(res, torch.tensor([0, 1]))
    assert stats["canaries_exposed"] == 1 + int(bool((pick == 1).any()))
    assert stats["canary_exposure"][0] == pytest.approx(1.0 - float(res.exposure.recon_population[0]), abs=1e-4)


def test_bad_controls_and_kkt_settings_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        controls.parse(["--controls", "leaky-fc,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        controls.parse(["--kkt-set", "lambda_min=-1"])
    with pytest.raises(SystemExit):
        controls.parse(["--kkt-set", "lr"])
    assert controls.parse(["--kkt-set", "lr=3e-2", "--kkt-set", "weight_decay_form=false"]).kkt == \
        {"lr": 0.03, "weight_decay_form": False}
