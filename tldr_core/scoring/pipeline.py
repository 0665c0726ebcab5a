"""One attack -> score -> nearest sequence, shared by the audit, the search trial and the bench.

    out = run_tldr(classifier, bundle.num_classes, bundle.image_shape, cfg)   # or any attack's AttackOutput
    scored = score_attack(out, classifier, bundle, tau=tau, seed=cfg.seed)    # metrics + nearest images
    # then tldr_core.report.artifacts.write_artifacts(folder, bundle, scored) for the files

:func:`attack_and_score` is the first two lines for the TLDR generator. The pictures and the
checkpoint are written one layer up (:mod:`tldr_core.report.artifacts`), because drawing is the
report layer's job. What the audit page shows beside an attack is computed here too:
:func:`heldout_nearest` (real unseen images beside their nearest training image),
:func:`exposure_gallery` (the most exposed training images, each beside the reconstruction that
reached it and that reconstruction's best match among unseen images; ``Scored.gallery``), and
:func:`template_attack` scores the weight-template attack the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tldr_core.attack.config import AttackConfig
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.templates import RENDERINGS, TemplateResult, weight_templates
from tldr_core.attack.tldr import run_tldr
from tldr_core.attack.train import Callback
from tldr_core.scoring.exposure_score import ExposureResult, score_exposure
from tldr_core.scoring.gap_test import gap_permutation_test
from tldr_core.scoring.metrics import baseline_sets, score_reconstructions
from tldr_core.scoring.nearest import ReferenceIndex, SearchStats
from tldr_core.scoring.ssim import ssim_matrix

GALLERY_SIZE = 16  # training images in an exposure gallery


@dataclass(frozen=True)
class GalleryRow:
    """One training image of the exposure gallery (docs/method.md §7).

    train_index, label: the training image (index into ``bundle.train``) and its class;
    exposure: its calibrated exposure e_cal(t); raw_exposure: the SSIM of ``recon_image`` to
    ``train_image``; exposed: e_cal(t) > the threshold; recon_index: the reconstruction reaching
    e_cal(t); heldout_index: index into ``bundle.heldout`` of that reconstruction's most similar image
    of the same class in H' (-1: none), heldout_ssim its SSIM (NaN: none); population_index: index into
    the population (``bundle.test``) of its most similar population image, population_ssim its SSIM.
    Images are (C, H, W) float32 in [0, 1] (the reconstruction clamped, as scored).
    """

    train_index: int
    label: int
    exposure: float
    raw_exposure: float
    exposed: bool
    train_image: Tensor
    recon_index: int
    recon_image: Tensor
    heldout_index: int
    heldout_image: Tensor | None
    heldout_ssim: float
    population_index: int = -1
    population_image: Tensor | None = None
    population_ssim: float = math.nan


@dataclass(frozen=True)
class ExposureGallery:
    """The ``top`` most exposed training images, by e_cal(t) descending (ties: by index); rows below the
    threshold are included (exposed False) when fewer than ``top`` are exposed. threshold, fpr,
    exposed (the count over all of T) and by_chance (fpr x |T|) are ExposureResult's."""

    rows: list[GalleryRow]
    threshold: float
    fpr: float
    exposed: int
    train_size: int
    by_chance: float = math.nan
    distinct: int = -1
    above_chance: bool = False  # the TPR interval's lower end is above the FPR


@dataclass
class Scored:
    """Images with their scores and their nearest training images (what reports and montages draw).

    images: (R, C, H, W) float32 on the CPU; labels: (R,) int64; metrics: score_reconstructions'
    dict ({} for images that were not scored as an attack); nearest_index: (R,) int64 index into the
    training set of each image's same-class nearest training image; nearest_ssim: (R,) float64 its
    SSIM; out: the AttackOutput scored (None for reference images); exposure: per-training-image
    exposure (docs/method.md §7), its summary also in ``metrics`` (None for reference images);
    gallery: :func:`exposure_gallery` of it (None for reference images or ``gallery_size=0``).
    """

    images: Tensor
    labels: Tensor
    metrics: dict[str, float]
    nearest_index: Tensor
    nearest_ssim: Tensor
    out: AttackOutput | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    exposure: ExposureResult | None = None
    gallery: ExposureGallery | None = None

    @property
    def kind(self) -> str:
        return self.out.kind if self.out is not None else "reference"

    @property
    def steps(self) -> int:
        return self.out.steps if self.out is not None else 0


def score_attack(out: AttackOutput, classifier: nn.Module | None, bundle: Any, *, tau: float = 0.5, seed: int = 0,
                 n_boot: int = 1000, method: str = "prefilter", index: ReferenceIndex | None = None,
                 stats: SearchStats | None = None, gallery_size: int = GALLERY_SIZE) -> Scored:
    """Score an attack's reconstructions against ``bundle`` (``.train``, ``.heldout`` splits) and find
    each one's nearest training image.

    The classifier is moved to the CPU (in place, as ``nn.Module.cpu`` does) for label agreement.
    ``index``: a ReferenceIndex of ``bundle.train`` to reuse across calls (else one is made here);
    ``stats``: counters the nearest-neighbour searches add to. ``seed`` seeds the gap's bootstrap.
    ``gallery_size``: training images in ``Scored.gallery`` (0: no gallery).
    """
    index = index if index is not None else reference_index(bundle)
    metrics, exp = score_images(out.images, out.labels, classifier, bundle, tau=tau, seed=seed, n_boot=n_boot,
                                method=method, index=index, stats=stats)
    near = index.nearest(out.images, out.labels, stats=stats)  # the default search, as every report shows it
    gallery = exposure_gallery(exp, out.images, bundle, top=gallery_size) if gallery_size else None
    return Scored(out.images, out.labels, metrics, near.index, near.values, out, exposure=exp, gallery=gallery)


def score_images(images: Tensor, labels: Tensor, classifier: nn.Module | None, bundle: Any, *, tau: float = 0.5,
                 seed: int = 0, n_boot: int = 1000, method: str = "prefilter", index: ReferenceIndex | None = None,
                 stats: SearchStats | None = None) -> tuple[dict[str, float], ExposureResult]:
    """Every score of one set of reconstructions: score_reconstructions' metrics (quality, gap,
    coverage, label agreement, ...) and the exposure summary (exposure_auc, exposure_tpr, ...), in one
    flat dict, and the per-image ExposureResult. The search trial scores its progress with this too."""
    index = index if index is not None else reference_index(bundle)
    if classifier is not None:
        classifier = classifier.cpu()
    metrics = score_reconstructions(images, labels, index, bundle.heldout, classifier=classifier, tau=tau,
                                    seed=seed, n_boot=n_boot, method=method, stats=stats)
    exp = score_exposure(images, labels, bundle.train, bundle.heldout, population(bundle), seed=seed, n_boot=n_boot)
    _, gap_p = gap_permutation_test(images, labels, bundle.train, bundle.heldout, n_perm=n_boot, seed=seed)
    return {**metrics, "gap_p": gap_p, **exp.metrics()}, exp


def attack_and_score(classifier: nn.Module, bundle: Any, cfg: AttackConfig, *, tau: float = 0.5,
                     callback: Callback | None = None, log: Callable[[str], None] | None = print,
                     log_every: int = 100, index: ReferenceIndex | None = None,
                     stats: SearchStats | None = None) -> Scored:
    """:func:`~tldr_core.attack.tldr.run_tldr` against ``classifier`` on ``bundle``'s shapes, then
    :func:`score_attack` (bootstrap seed ``cfg.seed``). ``scored.out`` holds the generator."""
    out = run_tldr(classifier, bundle.num_classes, bundle.image_shape, cfg, callback=callback, log=log,
                   log_every=log_every)
    return score_attack(out, classifier, bundle, tau=tau, seed=cfg.seed, index=index, stats=stats)


def template_attack(model: nn.Module, bundle: Any, *, tau: float = 0.5, seed: int = 0,
                    renderings: tuple[str, ...] = RENDERINGS, index: ReferenceIndex | None = None) -> TemplateResult:
    """The weight-template attack (first layer fully connected) scored like any reconstructions: metrics
    and nearest training images filled in. ``model`` is moved to the CPU in place."""
    model = model.cpu()
    index = index if index is not None else reference_index(bundle)
    res = weight_templates(model, tuple(bundle.image_shape), renderings=renderings)
    res.metrics, res.exposure = score_images(res.images, res.labels, model, bundle, tau=tau, seed=seed, index=index)
    res.gallery = exposure_gallery(res.exposure, res.images, bundle)
    near = index.nearest(res.images, res.labels)
    res.nearest_index, res.nearest_ssim = near.index, near.values
    return res


def exposure_gallery(exp: ExposureResult, images: Tensor, bundle: Any, *, top: int = GALLERY_SIZE) -> ExposureGallery:
    """The ``top`` most exposed training images (by e_cal(t) descending, ties by index, as exposure.csv),
    each with the reconstruction that reached it, that reconstruction's best same-class match in H' and
    its best match in the population.

    exp: score_exposure's result for ``images`` (the reconstructions it scored, (R, C, H, W)) against
    ``bundle.train``, ``bundle.heldout`` and the population ``bundle.test``. Training images whose class
    has no reconstruction are left out (nothing reached them). The H' and population matches answer
    "would an unseen image have matched as well?".
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    order = torch.sort(-exp.e_train, stable=True).indices
    order = order[exp.best_recon_train[order] >= 0][:top]
    recon_idx = exp.best_recon_train[order]
    recons = images[recon_idx].detach().cpu().float().clamp(0.0, 1.0)  # scored clamped (score_exposure)
    labels = exp.train_labels[order]
    best, best_ssim = _heldout_matches(recons, labels, exp.heldout_index, bundle.heldout)
    pop = population(bundle)
    out = []
    for k, t in enumerate(order.tolist()):
        r, p = int(recon_idx[k]), int(exp.recon_population_index[recon_idx[k]])
        out.append(GalleryRow(
            train_index=int(t), label=int(labels[k]), exposure=float(exp.e_train[t]),
            raw_exposure=float(ssim_matrix(recons[k:k + 1], bundle.train.images[t:t + 1].cpu().float())[0, 0]),
            exposed=bool(exp.e_train[t] > exp.threshold), train_image=bundle.train.images[t].cpu().float(),
            recon_index=r, recon_image=recons[k], heldout_index=int(best[k]),
            heldout_image=bundle.heldout.images[best[k]].cpu().float() if best[k] >= 0 else None,
            heldout_ssim=float(best_ssim[k]), population_index=p, population_image=pop.images[p].cpu().float(),
            population_ssim=float(exp.recon_population[r])))
    return ExposureGallery(out, float(exp.threshold), float(exp.fpr), int(exp.exposed), int(exp.e_train.numel()),
                           by_chance=exp.by_chance, distinct=exp.exposed_distinct,
                           above_chance=exp.tpr_ci[0] > exp.fpr)


def _heldout_matches(recons: Tensor, labels: Tensor, h_idx: Tensor, heldout: Any) -> tuple[Tensor, Tensor]:
    """Each reconstruction's best same-class image of H' (``h_idx`` into ``heldout``): (index, SSIM), -1 / NaN
    where H' has none of the class. One SSIM block per class; the lowest H' index wins ties."""
    h_lab = heldout.labels[h_idx].cpu()
    best = torch.full((len(labels),), -1, dtype=torch.int64)
    best_ssim = torch.full((len(labels),), math.nan, dtype=torch.float64)
    for c in torch.unique(labels).tolist():
        rows, cand = (labels == c).nonzero(as_tuple=True)[0], h_idx[h_lab == c]
        if cand.numel():
            s = ssim_matrix(recons[rows], heldout.images[cand].cpu().float()).to(torch.float64)
            top_s, j = s.max(dim=1)
            best[rows], best_ssim[rows] = cand[j], top_s
    return best, best_ssim


def population(bundle: Any) -> Any:
    """The audit's population set P (docs/method.md §7): the test split, disjoint from T and H'."""
    return bundle.test


def heldout_nearest(bundle: Any, per_class: int, *, seed: int = 0, index: ReferenceIndex | None = None) -> Scored:
    """Real unseen images (the "heldout_real" baseline set: ``per_class`` test images per class, seeded)
    beside their nearest training image: how close data the model never saw comes to its training set."""
    index = index if index is not None else reference_index(bundle)
    real, real_y = baseline_sets(bundle.train, bundle.test, bundle.num_classes, per_class, seed=seed)["heldout_real"]
    near = index.nearest(real, real_y)
    return Scored(real, real_y, {}, near.index, near.values)


def reference_index(bundle: Any) -> ReferenceIndex:
    """A ReferenceIndex of ``bundle.train`` to share between the calls above."""
    return ReferenceIndex(bundle.train.images, bundle.train.labels, name="train")
