"""Tests of tldr_core.scoring.exposure_score: raw and calibrated exposure of T and H' against a
population, on hand-built sets whose answer is known (a copy of a training image is exposed; a class
mean is not; an image whose population twin is reconstructed is not), the metrics and exposure.csv."""
from __future__ import annotations

import csv

import pytest
import torch

from tldr_core.scoring.exposure import NO_RECON
from tldr_core.scoring.exposure_score import NO_RECON_CAL, ExposureResult, exposure_keys, score_exposure
from tldr_core.scoring.membership import auc
from tldr_core.scoring.ssim import ssim_matrix

from image_sets import S, textures  # noqa: E402 - tests/scoring/image_sets.py

pytestmark = pytest.mark.usefixtures("one_thread")


def _copies_setup():
    """4 classes x 25 training and 30 held-out images (H' = first 25 per class), a population of 40
    random textures per class. Reconstructions: two exact copies each of training images 5 (class 0),
    30 (class 1), 57 (class 2) plus 3 noise images per class 0..2; class 3 has no reconstruction.
    Held-out images 0 and 1 (class 0) are near-copies (SSIM ~0.95) of training image 5: an unseen
    image can look like a memorised one, and they set the 1 % threshold (the 2nd largest H' score)."""
    train = S(textures(100, 10), torch.arange(4).repeat_interleave(25))
    h_img, h_lab = textures(120, 11), torch.arange(4).repeat_interleave(30)
    g = torch.Generator().manual_seed(12)
    h_img[:2] = (train.images[5] + 0.1 * torch.randn(2, 1, 16, 16, generator=g)).clamp(0, 1)
    copied = [5, 30, 57]
    recon = torch.cat([train.images[copied], torch.rand(9, 1, 16, 16, generator=g), train.images[copied]])
    rl = torch.cat([torch.tensor([0, 1, 2]), torch.arange(3).repeat_interleave(3), torch.tensor([0, 1, 2])])
    pop = S(textures(160, 13), torch.arange(4).repeat_interleave(40))
    return recon, rl, train, S(h_img, h_lab), pop, copied


def test_exact_copies_flag_exactly_those_images():
    recon, rl, train, heldout, pop, copied = _copies_setup()
    res = score_exposure(recon, rl, train, heldout, pop, n_boot=200)
    assert isinstance(res, ExposureResult) and res.population_size == 160 and res.calibration == "recon"
    assert res.e_train.shape == (100,) and res.e_heldout.shape == (100,)
    assert torch.equal(res.heldout_index, torch.cat([torch.arange(c * 30, c * 30 + 25) for c in range(4)]))
    # raw: the copies reach SSIM 1, first by reconstructions 0, 1, 2 (their duplicates tie)
    assert torch.allclose(res.raw_train[copied], torch.ones(3, dtype=torch.float64), atol=1e-5)
    # calibrated: 1 minus the copy's best population SSIM (hand: from the SSIM matrix)
    p_best = torch.stack([ssim_matrix(train.images[[i]], pop.images[pop.labels == c]).double().max()
                          for i, c in zip(copied, (0, 1, 2))])
    assert torch.allclose(res.e_train[copied], 1 - p_best, atol=1e-5)
    assert res.best_recon_train[copied].tolist() == [0, 1, 2]
    # threshold: the 2nd largest calibrated H' score = the lower near-copy's SSIM minus recon 0's offset
    near = ssim_matrix(heldout.images[:2], train.images[5:6]).double().squeeze(1)
    assert res.threshold == pytest.approx(float(near.min() - p_best[0]), abs=1e-5)
    assert sorted(res.exposed_index.tolist()) == copied and res.exposed == 3 and res.exposed_distinct == 3
    assert res.tpr == pytest.approx(3 / 100) and res.by_chance == pytest.approx(1.0)
    assert (res.e_train[res.exposed_index].diff() <= 0).all()  # by exposure, descending
    # class 3 (no reconstruction): the documented floors, never exposed
    assert (res.raw_train[75:] == NO_RECON).all() and (res.e_train[75:] == NO_RECON_CAL).all()
    assert (res.best_recon_train[75:] == -1).all() and (res.e_heldout[75:] == NO_RECON_CAL).all()
    # one-to-one: each copied image counts once although copied twice; the two near-copies pair with
    # the two copies of image 5. Fisher (hand): 3 of 100 vs 2 of 100, p = P(X >= 3 | 5 of 200) = 0.5
    assert {b: (v["train"], v["heldout"]) for b, v in res.matched.items()} == {0.4: (3, 2), 0.6: (3, 2)}
    assert res.matched[0.6]["p"] == pytest.approx(0.5, abs=1e-12)
    assert res.auc == pytest.approx(auc(res.e_train, res.e_heldout))
    assert res.raw.auc == pytest.approx(auc(res.raw_train, res.raw_heldout))


def test_population_twin_of_a_training_image_is_not_exposed():
    """A reconstruction that copies a population image: its training look-alike has raw exposure ~0.95
    (exposed by the raw score) but calibrated exposure below 0 (the population explains it)."""
    recon, rl, train, heldout, pop, copied = _copies_setup()
    g = torch.Generator().manual_seed(14)
    twin = (train.images[40] + 0.08 * torch.randn(1, 16, 16, generator=g)).clamp(0, 1)  # class 1
    pop.images[45] = twin[0]
    recon = torch.cat([recon, twin[None]])
    rl = torch.cat([rl, torch.tensor([1])])
    for calibration in ("recon", "image"):
        res = score_exposure(recon, rl, train, heldout, pop, n_boot=50, calibration=calibration)
        assert res.raw_train[40] > 0.9 and 40 in res.raw.exposed_index.tolist()
        assert res.e_train[40] <= 1e-6 and 40 not in res.exposed_index.tolist()  # "image": exactly 0


def test_class_mean_is_not_exposed():
    """Each class: a fixed pattern plus noise. The class mean of T is close to every image of the class,
    training, held-out and population alike, so it exposes no training image beyond chance."""
    g = torch.Generator().manual_seed(15)
    base = torch.rand(4, 1, 16, 16, generator=g)

    def draw(per_class: int) -> S:
        y = torch.arange(4).repeat_interleave(per_class)
        return S((base[y] + 0.25 * torch.randn(len(y), 1, 16, 16, generator=g)).clamp(0, 1), y)

    train, heldout, pop = draw(50), draw(50), draw(200)
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(4)])
    res = score_exposure(means, torch.arange(4), train, heldout, pop, n_boot=300)
    assert float(res.raw_train.mean()) > 0.3  # the mean does look like the class...
    assert float(res.e_train.max()) < 0.05 and res.exposed_distinct <= 4  # ...but singles no image out
    assert res.tpr_ci[0] <= 0.01 + 1e-12


def test_image_calibration_by_hand():
    recon, rl, train, heldout, pop, copied = _copies_setup()
    res = score_exposure(recon, rl, train, heldout, pop, n_boot=50, calibration="image")
    own = torch.stack([ssim_matrix(train.images[[i]], pop.images[pop.labels == int(train.labels[i])]).double().max()
                       for i in range(75)])
    assert torch.allclose(res.e_train[:75], res.raw_train[:75] - own, atol=1e-5)
    assert sorted(res.exposed_index.tolist()) == copied


def test_metrics_rows_and_csv(tmp_path):
    recon, rl, train, heldout, pop, copied = _copies_setup()
    res = score_exposure(recon, rl, train, heldout, pop, n_boot=50)
    m = res.metrics()
    assert tuple(m) == exposure_keys((0.4, 0.6)) and all(isinstance(v, float) for v in m.values())
    assert m["exposed_count"] == 3.0 and m["exposed_distinct"] == 3.0 and m["exposed_by_chance"] == 1.0
    assert m["matched_train_040"] == 3.0 and m["matched_heldout_060"] == 2.0 and m["matched_p_060"] == 0.5
    assert m["exposure_tpr"] == pytest.approx(0.03) and m["exposure_fpr"] == 0.01 and m["population_size"] == 160
    assert m["exposure_mean_train"] == pytest.approx(float(res.e_train.mean()))
    assert m["raw_exposure_mean_train"] == pytest.approx(float(res.raw_train.mean()))
    assert m["raw_exposed_count"] == res.raw.exposed
    rows = res.rows()
    assert len(rows) == 100 and [r["exposed"] for r in rows[:4]] == [True, True, True, False]
    assert sorted(r["train_index"] for r in rows[:3]) == copied
    assert rows[-1]["exposure"] == NO_RECON_CAL and rows[-1]["raw_exposure"] == NO_RECON and rows[-1]["label"] == 3
    path = res.write_csv(tmp_path / "out" / "exposure.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["train_index", "label", "exposure", "raw_exposure", "recon_index", "population_ssim",
                             "exposed"]
    assert [int(r["train_index"]) for r in read] == [r["train_index"] for r in rows]
    assert read[0]["exposed"] == "True" and float(read[0]["raw_exposure"]) == pytest.approx(1.0, abs=1e-5)


def test_score_exposure_validation():
    recon, rl, train, heldout, pop, _ = _copies_setup()
    with pytest.raises(ValueError, match="no reconstructions"):
        score_exposure(recon[:0], rl[:0], train, heldout, pop)
    with pytest.raises(ValueError, match="fpr"):
        score_exposure(recon, rl, train, heldout, pop, fpr=1.0)
    with pytest.raises(ValueError, match="bars"):
        score_exposure(recon, rl, train, heldout, pop, bars=(0.4, 0.401))  # both would be named _040
    with pytest.raises(ValueError, match="n_boot"):
        score_exposure(recon, rl, train, heldout, pop, n_boot=0)
    with pytest.raises(ValueError, match="no held-out"):
        score_exposure(recon, rl, train, S(heldout.images, heldout.labels + 10), pop)
    with pytest.raises(ValueError, match="calibration"):
        score_exposure(recon, rl, train, heldout, pop, calibration="both")
    with pytest.raises(ValueError, match="population set has no image of class"):
        score_exposure(recon, rl, train, heldout, S(pop.images[:40], pop.labels[:40]))
