"""A shrunk CIFAR-shaped audit end to end: 3x32x32 colour images from an .npz in the dev file's format."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity as sk_ssim

from tldr_core.attack.data import load_dataset
from tldr_core.cli import audit


def _write_cifar_npz(path, per_class=8, test_per_class=4, seed=0):
    """uint8 (N, 32, 32, 3) + labels, x_test/y_test: the layout of the CIFAR-10 dev file. Each class has its
    own colour so a one-epoch classifier is better than chance and the pictures have colour to show."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(10, 3))
    out = {}
    for split, k in (("train", per_class), ("test", test_per_class)):
        y = np.repeat(np.arange(10), k)
        noise = rng.normal(0, 40, size=(len(y), 32, 32, 3))
        out[f"x_{split}"] = np.clip(palette[y][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        out[f"y_{split}"] = y
    np.savez(path, **out)


@pytest.mark.slow
def test_cifar_shaped_audit_end_to_end(tmp_path, tmp_cache, capsys):
    data = tmp_path / "cifar-tiny.npz"
    _write_cifar_npz(data)
    out = tmp_path / "audit"
    code = audit.main(["--dataset", "cifar10", "--data-root", str(data), "--train-size", "30",
                       "--classifier-epochs", "1", "--steps", "4", "--per-class", "2", "--batch-size", "8",
                       "--out", str(out), "--device", "cpu", "--membership-refs", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["dataset"]["image_shape"] == [3, 32, 32] and record["dataset"]["num_classes"] == 10
    rec = np.load(out / "reconstructions.npz")
    images, labels = rec["images"], rec["labels"]
    assert images.shape == (20, 3, 32, 32) and np.bincount(labels).tolist() == [2] * 10
    assert len((out / "exposure.csv").read_text().splitlines()) == 1 + 30
    assert record["risk"] in ("LOW", "MEDIUM", "HIGH")
    # quality = mean over reconstructions of the best same-class SSIM to T, SSIM over 3 channels as
    # scikit-image's channel_axis computes it (mean of the per-channel SSIMs)
    train = load_dataset("cifar10", 30, data_root=data).train
    best = [max(sk_ssim(images[i].astype(np.float64), t.double().numpy(), data_range=1.0, channel_axis=0)
                for t in train.images[train.labels == int(labels[i])]) for i in range(len(images))]
    assert record["metrics"]["quality"] == pytest.approx(float(np.mean(best)), abs=1e-4)
    # the pictures are in colour: the nearest training images (one colour per class here) keep their colour
    pairs = np.asarray(Image.open(out / "nearest.png").convert("RGB")).astype(int)
    assert np.abs(pairs[..., 0] - pairs[..., 1]).max() > 60
    html = (out / "report.html").read_text()
    assert "airplane" in html and "truck" in html  # CIFAR's class names, not 0-9
