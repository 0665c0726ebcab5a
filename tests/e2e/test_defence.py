"""The defence comparison: one training choice changed per variant, one table row per variant, both attacks."""
import csv
import json

import pytest
import torch

from tldr_core.cli import defence
from tldr_core.cli.defence import VARIANTS, base_settings, variant_settings


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_each_variant_changes_exactly_one_training_choice():
    base = base_settings("mlp", 10, 0).__dict__
    assert base["optimizer"] == "sgd" and base["weight_decay"] == 0 and base["dropout"] == 0 and base["hidden"] == 0
    for v in VARIANTS:
        s, t = variant_settings(v, "mlp", 10, 1000, 0)
        changed = {k for k, val in s.__dict__.items() if val != base[k]} - {"epochs"}
        if v.name == "base":
            assert not changed and t == 1000
        elif v.train_size:  # size variants keep the base's number of gradient steps
            assert not changed and t == v.train_size and s.epochs == round(10 * 1000 / t)
        else:
            assert t == 1000 and changed <= {"optimizer", "lr", "weight_decay", "dropout"} and changed
            assert changed == set(v.overrides)


@pytest.mark.slow
def test_defence_command_writes_one_row_per_variant_with_both_attacks(tmp_path, tmp_cache, capsys):
    out = tmp_path / "defence"
    names = ["base", "adam", "wd-1e-1", "T-2000"]
    code = defence.main(["--dataset", "digits-8x8", "--smoke-test", "--variants", ",".join(names), "--archs", "mlp",
                         "--generator-archs", "mlp", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "[1/4] base" in printed.out and "min left" in printed.out  # progress while it runs
    with (out / "defence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == names
    for r in rows:
        for key in ("mlp_acc", "mlp_templates_quality", "mlp_templates_gap", "mlp_generator_quality",
                    "mlp_generator_gap_ci_low", "baseline_class_mean_quality"):
            assert r[key] not in ("", None), key
        assert r["mlp_templates_risk"] in ("LOW", "MEDIUM", "HIGH")
    assert rows[3]["train_size"] == "200" and rows[0]["train_size"] == "100"  # smoke: T-2000 capped at 2x base
    md = (out / "defence.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(names) and "weight templates (mlp): quality" in md[0]
    for name in ("defence.png", "templates.png", "generator.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 4 and res["settings"]["steps"] == 5
    assert "risk:" in (out / "report.html").read_text()


def test_unknown_variant_is_rejected_before_any_work(tmp_path, capsys):
    assert defence.main(["--variants", "base,sgd-fast", "--out", str(tmp_path / "o")]) == 2
    assert "sgd-fast" in capsys.readouterr().err and not (tmp_path / "o").exists()
