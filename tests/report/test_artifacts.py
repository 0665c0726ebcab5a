"""tldr_core.report.artifacts: the files every scored attack leaves (audit, search trial, bench)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import matplotlib.pyplot as plt
from matplotlib import colors

from tldr_core.attack.checkpoints import load_generator
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.train import generate
from tldr_core.report.artifacts import checkpoint_name, grid_title, write_artifacts
from tldr_core.report.pictures import EXPOSED_COLOUR, exposure_gallery_figure
from tldr_core.scoring.pipeline import Scored, attack_and_score, score_attack

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_write_artifacts_writes_the_files_and_a_loadable_checkpoint(digits_case, tmp_path):
    bundle, clf, cfg = digits_case
    scored = attack_and_score(clf, bundle, cfg, log=None)
    paths = write_artifacts(tmp_path / "a", bundle, scored, meta={"classifier": "c.pt"})
    assert {p.name for p in paths.values()} == {"reconstructions.npz", "grid.png", "nearest.png", "generator.pt",
                                                "exposure.csv", "exposure.png"}
    rec = np.load(paths["reconstructions"])
    assert rec["images"].dtype == np.float32 and np.array_equal(rec["images"], scored.images.numpy())
    assert rec["labels"].dtype == np.int64 and rec["labels"].tolist() == scored.labels.tolist()
    assert paths["grid"].stat().st_size > 500 and paths["nearest"].stat().st_size > 500
    gen, meta = load_generator(paths["checkpoint"])
    assert meta["attack"] == cfg.flat() and meta["dataset"] == bundle.name and meta["classifier"] == "c.pt"
    images, _ = generate(gen, cfg.per_class, seed=cfg.seed + 1)  # the saved generator reproduces the images
    assert torch.equal(images, scored.images)
    m = scored.metrics
    assert grid_title(bundle, scored) == (f"digits-8x8: {cfg.variant} generator, quality {m['quality']:.3f}, "
                                          f"label agreement {m['label_agreement']:.2f}")
    assert grid_title(bundle, scored, prefix="trial 3").startswith("trial 3, quality ")
    assert checkpoint_name("tldr") == "generator.pt" and checkpoint_name("kkt") == "kkt.pt"


def test_write_artifacts_without_a_module_writes_no_checkpoint(digits_case, tmp_path):
    bundle, _, _ = digits_case
    out = AttackOutput("templates", torch.rand(10, 1, 8, 8), torch.arange(10))
    scored = Scored(out.images, out.labels, {"quality": 0.1, "label_agreement": 0.5},
                    torch.zeros(10, dtype=torch.int64),
                    torch.zeros(10, dtype=torch.float64), out)
    paths = write_artifacts(tmp_path, bundle, scored, title="t")
    assert "checkpoint" not in paths and not list(tmp_path.glob("*.pt"))
    assert "exposure" not in paths and not list(tmp_path.glob("exposure.*"))  # not scored for exposure: no files


def test_exposure_csv_and_gallery_show_the_scored_exposure(digits_case, tmp_path):
    bundle, clf, _ = digits_case
    idx = torch.arange(0, 50, 5)  # ten training images, copied: they come back exactly
    scored = score_attack(AttackOutput("kkt", bundle.train.images[idx], bundle.train.labels[idx]), clf, bundle,
                          n_boot=20)
    paths = write_artifacts(tmp_path, bundle, scored, checkpoint=False)
    with paths["exposure"].open() as f:
        rows = list(csv.DictReader(f))
    want = scored.exposure.rows()
    assert len(rows) == len(bundle.train) == len(want)
    assert [int(r["train_index"]) for r in rows] == [w["train_index"] for w in want]
    assert [float(r["exposure"]) for r in rows] == pytest.approx([w["exposure"] for w in want])
    assert sum(r["exposed"] == "True" for r in rows) == scored.exposure.exposed
    assert paths["exposure_gallery"].name == "exposure.png" and paths["exposure_gallery"].stat().st_size > 2000
    # the picture's captions carry each row's numbers; exposed training images are captioned in red
    fig = exposure_gallery_figure(scored.gallery, bundle.class_names)
    texts = [t for t in fig.axes[0].texts]
    for r in scored.gallery.rows:
        train_caption = next(t for t in texts if t.get_text().startswith(f"train #{r.train_index}\n"))
        assert (colors.to_hex(train_caption.get_color()) == EXPOSED_COLOUR) == r.exposed
        assert any(t.get_text() == f"recon #{r.recon_index}\nSSIM {r.raw_exposure:.2f} ({r.exposure:+.2f})"
                   for t in texts)
        assert any(t.get_text() == f"held-out #{r.heldout_index}\nSSIM {r.heldout_ssim:.2f}" for t in texts)
        assert any(t.get_text() == f"population #{r.population_index}\nSSIM {r.population_ssim:.2f}" for t in texts)
    assert scored.gallery.rows[0].raw_exposure == pytest.approx(1.0)  # an exact copy heads the gallery
    title = fig.texts[0].get_text()
    assert f"{scored.exposure.exposed} of {len(bundle.train)} exposed" in title
    assert f"about {0.01 * len(bundle.train):.0f} expected by chance at 1% FPR" in title
    plt.close(fig)
