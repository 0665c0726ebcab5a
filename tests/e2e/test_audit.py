"""The audit command end to end on the embedded set (tiny sizes), and its bad-input paths."""
import json

import numpy as np
import pytest
import torch

from tldr_core.cli import audit
from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
from tldr_core.attack.models import PaperCNN


def _run(argv, capsys):
    code = audit.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_audit_end_to_end_on_bundled_mnist(tmp_path, tmp_cache, capsys):
    out = tmp_path / "demo"
    argv = ["--dataset", "mnist-bundled", "--train-size", "100", "--classifier-epochs", "2", "--steps", "15",
            "--per-class", "3", "--batch-size", "16", "--out", str(out), "--device", "cpu",
            "--membership-refs", "2"]  # LiRA on Ray as by default, with the fewest reference models it takes
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "step" in stdout and "quality" in stdout  # visible progress and a summary
    assert sorted(p.name for p in out.iterdir()) == sorted(audit.OUTPUT_FILES)
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    for key in ("quality", "quality_heldout", "gap", "gap_ci_low", "gap_ci_high", "coverage", "label_agreement",
                "diversity"):
        assert key in m and np.isfinite(m[key]), key
    assert set(record["baselines"]) == {"noise", "class_mean", "heldout_real"}
    assert 0 <= m["exposure_auc_lo"] <= m["exposure_auc"] <= m["exposure_auc_hi"] <= 1
    assert record["risk"] in ("LOW", "MEDIUM", "HIGH") and record["risks"]["tldr"]["risk"] == record["risk"]
    assert len((out / "exposure.csv").read_text().splitlines()) == 1 + 100  # header + every training image
    assert record["settings"]["steps"] == 15 and "grad" in record["settings"]
    assert 0 <= record["classifier"]["test_accuracy"] <= 1
    rec = np.load(out / "reconstructions.npz")
    assert rec["images"].dtype == np.float32 and rec["images"].shape == (30, 1, 28, 28)
    assert rec["labels"].dtype == np.int64 and np.bincount(rec["labels"]).tolist() == [3] * 10
    assert rec["images"].min() >= 0 and rec["images"].max() <= 1
    # quality is the mean nearest-training-image SSIM of exactly these images
    assert m["quality"] == pytest.approx(record["metrics"]["quality"])
    # second run reuses the cached classifier instead of retraining it (--overwrite: --out holds the first run)
    code, stdout, _ = _run([*argv, "--overwrite", "--no-membership"], capsys)  # the references' cache: test_references
    assert code == 0 and "reusing" in stdout


def test_unknown_dataset_is_one_clear_error(tmp_path, capsys):
    code, _, err = _run(["--dataset", "imagenet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "imagenet" in err and "mnist-bundled" in err
    assert not (tmp_path / "o").exists()


def test_missing_data_root_names_set_path_and_flag(tmp_path, capsys):
    code, _, err = _run(["--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"), "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 2 and "cifar10" in err and "nowhere" in err and "--download" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,needle", [("--grad", "-1", "grad"), ("--ce", "abc", "ce"),
                                                ("--steps", "0", "steps")])
def test_bad_weights_and_settings_fail_before_any_work(tmp_path, capsys, flag, value, needle):
    code, _, err = _run([flag, value, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err
    assert not (tmp_path / "o").exists()


def test_yaml_with_unknown_key_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("weights:\n  kl: 1\n  gradd: 2\n")
    code, _, err = _run(["--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "gradd" in err


def test_classifier_of_the_wrong_shape_is_rejected(tmp_path, capsys):
    f = save_checkpoint(tmp_path / "c.pt", PaperCNN((3, 32, 32), 10, width=4, hidden=8), CLASSIFIER_FORMAT)
    code, _, err = _run(["--classifier", str(f), "--train-size", "100", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "(3, 32, 32)" in err and "(1, 28, 28)" in err
    assert not (tmp_path / "o").exists()


def test_corrupt_classifier_file_is_rejected(tmp_path, capsys):
    f = tmp_path / "c.pt"
    f.write_bytes(b"not a checkpoint")
    code, _, err = _run(["--classifier", str(f), "--train-size", "100", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "c.pt" in err


def test_non_finite_loss_stops_the_run_and_leaves_no_complete_output(tmp_path, capsys):
    model = PaperCNN((1, 28, 28), 10, width=4, hidden=8).eval()
    with torch.no_grad():  # finite weights (a NaN weight is refused on loading) whose logits overflow to inf
        model.out.weight.fill_(3e38)
    f = save_checkpoint(tmp_path / "nan.pt", model, CLASSIFIER_FORMAT)
    out = tmp_path / "o"
    code, _, err = _run(["--classifier", str(f), "--train-size", "100", "--steps", "5", "--batch-size", "8",
                         "--out", str(out)], capsys)
    assert code == 2 and "non-finite" in err
    assert not (out / "metrics.json").exists()
