"""The one attack -> score -> nearest pipeline (tldr_core.attack.tldr, tldr_core.scoring.pipeline): the same
images and numbers as the steps done by hand, and the exposure gallery checked pair by pair with plain SSIM
(its files: tests/report/test_artifacts.py)."""
from __future__ import annotations

import pytest
import torch

from tldr_core.attack.checkpoints import GENERATOR_FORMAT
from tldr_core.attack.models import ConditionedGenerator
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.templates import weight_templates
from tldr_core.attack.tldr import run_tldr
from tldr_core.attack.train import generate, train_generator
from tldr_core.scoring.exposure_score import score_exposure
from tldr_core.scoring.gap_test import gap_permutation_test
from tldr_core.scoring.metrics import baseline_sets, nn_ssim, score_reconstructions
from tldr_core.scoring.pipeline import (attack_and_score, exposure_gallery, heldout_nearest, reference_index,
                                        score_attack, template_attack)
from tldr_core.scoring.ssim import ssim

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_run_tldr_draws_what_train_then_generate_draw(digits_case):
    bundle, clf, cfg = digits_case
    out = run_tldr(clf, bundle.num_classes, bundle.image_shape, cfg, log=None)
    res = train_generator(clf, bundle.num_classes, bundle.image_shape, cfg, log=None, log_every=100)
    images, labels = generate(res.generator, cfg.per_class, seed=cfg.seed + 1, device="cpu")
    assert torch.equal(out.images, images) and torch.equal(out.labels, labels)
    assert out.kind == "tldr" and out.images.shape == (20, 1, 8, 8) and out.labels.tolist()[:4] == [0, 0, 1, 1]
    assert isinstance(out.module, ConditionedGenerator) and out.checkpoint_format == GENERATOR_FORMAT
    assert out.settings == cfg.flat() and out.steps == 3 and out.history[-1]["step"] == 3


def test_score_attack_equals_the_metrics_and_nearest_images_by_hand(digits_case):
    bundle, clf, cfg = digits_case
    g = torch.Generator().manual_seed(1)
    out = AttackOutput("kkt", torch.rand(10, 1, 8, 8, generator=g), torch.arange(10))
    scored = score_attack(out, clf, bundle, tau=0.4, seed=3, n_boot=50)
    want = score_reconstructions(out.images, out.labels, bundle.train, bundle.heldout, classifier=clf, tau=0.4,
                                 seed=3, n_boot=50)
    exp = score_exposure(out.images, out.labels, bundle.train, bundle.heldout, bundle.test, seed=3, n_boot=50)
    gap, gap_p = gap_permutation_test(out.images, out.labels, bundle.train, bundle.heldout, n_perm=50, seed=3)
    want.update(gap_p=gap_p, **exp.metrics())  # one flat dict: the reconstruction metrics, the gap's test, exposure
    assert gap == pytest.approx(want["gap"], abs=1e-6)  # the test's observed gap is the metric's (brute vs prefilter)
    near = nn_ssim(out.images, out.labels, bundle.train.images, bundle.train.labels)
    assert scored.metrics == want and scored.metrics["tau"] == 0.4
    assert torch.equal(scored.exposure.e_train, exp.e_train) and scored.exposure.exposed == exp.exposed
    assert torch.equal(scored.nearest_index, near.index) and torch.equal(scored.nearest_ssim, near.values)
    assert scored.out is out and scored.kind == "kkt" and torch.equal(scored.images, out.images)
    # the same with an index shared across calls
    again = score_attack(out, clf, bundle, tau=0.4, seed=3, n_boot=50, index=reference_index(bundle))
    assert again.metrics == want


def test_attack_and_score_is_run_tldr_then_score_attack(digits_case):
    bundle, clf, cfg = digits_case
    scored = attack_and_score(clf, bundle, cfg, tau=0.5, log=None)
    out = run_tldr(clf, bundle.num_classes, bundle.image_shape, cfg, log=None)
    assert torch.equal(scored.images, out.images)  # same seeds, same images
    assert scored.metrics == score_attack(out, clf, bundle, tau=0.5, seed=cfg.seed).metrics
    assert scored.steps == cfg.steps and next(clf.parameters()).device.type == "cpu"


def test_heldout_nearest_and_template_attack_by_hand(digits_case):
    bundle, clf, cfg = digits_case
    real = heldout_nearest(bundle, 2, seed=4)
    images, labels = baseline_sets(bundle.train, bundle.test, bundle.num_classes, 2, seed=4)["heldout_real"]
    near = nn_ssim(images, labels, bundle.train.images, bundle.train.labels)
    assert torch.equal(real.images, images) and torch.equal(real.nearest_index, near.index)
    assert real.metrics == {} and real.out is None and real.kind == "reference"
    t = template_attack(clf, bundle, tau=0.5, seed=2)
    ref = weight_templates(clf, tuple(bundle.image_shape))
    assert torch.equal(t.images, ref.images) and t.method == "linear"
    assert t.metrics == {**score_reconstructions(ref.images, ref.labels, bundle.train, bundle.heldout, classifier=clf,
                                                 seed=2),
                         "gap_p": gap_permutation_test(ref.images, ref.labels, bundle.train, bundle.heldout, seed=2)[1],
                         **score_exposure(ref.images, ref.labels, bundle.train, bundle.heldout, bundle.test, seed=2).metrics()}
    assert torch.equal(t.nearest_ssim, nn_ssim(ref.images, ref.labels, bundle.train.images,
                                               bundle.train.labels).values)


def _copies_and_noise(bundle, per_class: int, classes: range, seed: int = 0):
    """Noisy copies of the first ``per_class`` training images of each class (they expose those) and one
    noise image per class (exposes nothing): (images, labels)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([(bundle.train.labels == c).nonzero().flatten()[:per_class] for c in classes])
    copies = (bundle.train.images[idx] + 0.03 * torch.randn(len(idx), 1, 8, 8, generator=g)).clamp(0, 1)
    noise = torch.rand(len(classes), 1, 8, 8, generator=g)
    return torch.cat([copies, noise]), torch.cat([bundle.train.labels[idx], torch.tensor(list(classes))])


def test_exposure_gallery_rows_are_the_most_exposed_images_with_their_recon_and_best_heldout_match(digits_case):
    bundle, clf, _ = digits_case
    images, labels = _copies_and_noise(bundle, 1, range(10))
    scored = score_attack(AttackOutput("kkt", images, labels), clf, bundle, n_boot=50)
    exp, gal = scored.exposure, scored.gallery
    assert 0 < exp.exposed < 16  # fewer exposed than shown: the rest fill up, marked not exposed
    assert len(gal.rows) == 16 and [r.exposed for r in gal.rows] == [True] * exp.exposed + [False] * (16 - exp.exposed)
    assert [r.train_index for r in gal.rows] == [row["train_index"] for row in exp.rows()[:16]]  # exposure.csv order
    assert gal.threshold == exp.threshold and gal.exposed == exp.exposed and gal.train_size == len(bundle.train)
    assert gal.by_chance == pytest.approx(0.01 * len(bundle.train)) and gal.distinct == exp.exposed_distinct
    h_images, h_labels = bundle.heldout.images, bundle.heldout.labels
    for r in gal.rows:
        assert torch.equal(r.train_image, bundle.train.images[r.train_index]) and r.label == bundle.train.labels[
            r.train_index]
        assert torch.equal(r.recon_image, images[r.recon_index].clamp(0, 1)) and labels[r.recon_index] == r.label
        raw = float(ssim(r.train_image, r.recon_image))
        assert raw == pytest.approx(r.raw_exposure, abs=1e-5)  # the recon's SSIM to it, by hand
        # the best population match of THIS reconstruction, by brute force; e_cal(t) = raw - that SSIM
        pool_p = (bundle.test.labels == r.label).nonzero().flatten()
        brute_p = torch.stack([ssim(r.recon_image, bundle.test.images[int(j)])[0] for j in pool_p])
        assert r.population_index == int(pool_p[int(brute_p.argmax())])
        assert r.population_ssim == pytest.approx(float(brute_p.max()), abs=1e-5)
        assert torch.equal(r.population_image, bundle.test.images[r.population_index])
        assert r.exposure == pytest.approx(raw - float(brute_p.max()), abs=1e-5)
        assert r.exposed == (r.exposure > exp.threshold)
        # the best H' match of THIS reconstruction, by brute force over H' images of its class
        pool = exp.heldout_index[h_labels[exp.heldout_index] == r.label]
        brute = torch.stack([ssim(r.recon_image, h_images[int(j)])[0] for j in pool])
        assert r.heldout_index == int(pool[int(brute.argmax())]) and r.heldout_ssim == pytest.approx(
            float(brute.max()), abs=1e-5)
        assert torch.equal(r.heldout_image, h_images[r.heldout_index])
    assert gal.rows[0].exposure > gal.rows[-1].exposure  # sorted, and copies beat the rest
    assert score_attack(AttackOutput("kkt", images, labels), clf, bundle, n_boot=10, gallery_size=0).gallery is None


def test_exposure_gallery_leaves_out_classes_without_reconstructions(digits_case):
    bundle, clf, _ = digits_case
    images, labels = _copies_and_noise(bundle, 2, range(3))  # classes 0-2 only
    exp = score_attack(AttackOutput("kkt", images, labels), clf, bundle, n_boot=10).exposure
    gal = exposure_gallery(exp, images, bundle, top=1000)
    assert len(gal.rows) == int((bundle.train.labels < 3).sum()) and {r.label for r in gal.rows} == {0, 1, 2}
    assert len(exposure_gallery(exp, images, bundle, top=4).rows) == 4
    with pytest.raises(ValueError, match="top"):
        exposure_gallery(exp, images, bundle, top=0)


def test_template_attack_has_a_gallery(digits_case):
    bundle, clf, _ = digits_case
    t = template_attack(clf, bundle, seed=2)
    assert t.gallery is not None and len(t.gallery.rows) == 16
    assert all(int(t.labels[r.recon_index]) == r.label for r in t.gallery.rows)
    assert [r.exposure for r in t.gallery.rows] == sorted(t.exposure.e_train.tolist(), reverse=True)[:16]
