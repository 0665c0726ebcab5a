"""The audit's exposure result: per-image scores of T and H' and the membership statistics on them.

:func:`score_exposure` scans the training set ``T``, the size-matched held-out set ``H'`` and the
population ``P`` against the reconstructions (:mod:`tldr_core.scoring.exposure`) and summarises
two per-image scores the same way (docs/method.md §7):

- the **calibrated** exposure e_cal (the primary score: AUC, TPR, the exposed images, the gallery),
  of the form ``calibration`` ("recon" by default, see :data:`~tldr_core.scoring.exposure.CALIBRATIONS`);
- the **raw** exposure e (best SSIM of any same-class reconstruction), kept as a secondary line.

For each: the Mann-Whitney **AUC** of T against H' and the **TPR at FPR** (1 % by default): the
threshold is the ``(k+1)``-th largest H' score, ``k = floor(fpr * |H'|)``; training images strictly
above it are **exposed**. Both with 95 % bootstrap intervals (T and H' resampled independently).
``exposed_distinct`` is how many exposed training images have a reconstruction of their own
(maximum one-to-one matching over the pairs above the threshold), and the one-to-one match
counts at SSIM bars come with Fisher's exact p-value of "more matches on T than on H'".
``H'`` is size-matched to ``T``: per class ``c`` of ``T`` its first ``|T_c|`` held-out images.
Reconstructions are clamped to [0, 1] first, as the other metrics do.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from tldr_core.scoring.exact_test import fisher_greater
from tldr_core.scoring.exposure import (CALIBRATIONS, NO_RECON, bar_tag, calibrated_matching, check_bars,
                                        population_match, scan)
from tldr_core.scoring.membership import _allowed, auc, bootstrap_intervals, tpr_at_fpr
from tldr_core.scoring.nearest import as_images, as_labels

__all__ = ["NO_RECON_CAL", "Separation", "ExposureResult", "exposure_keys", "score_exposure", "size_matched"]

NO_RECON_CAL = -2.0  # calibrated exposure of an image whose class has no reconstruction (below any SSIM difference)


@dataclass(frozen=True)
class Separation:
    """How one per-image score separates T from H': AUC and TPR at ``fpr`` with their 95 % intervals,
    the threshold, and the exposed training images (score > threshold, by score descending)."""

    auc: float
    auc_ci: tuple[float, float]
    tpr: float
    tpr_ci: tuple[float, float]
    threshold: float
    fpr: float
    exposed_index: Tensor

    @property
    def exposed(self) -> int:
        return int(self.exposed_index.numel())

    @classmethod
    def of(cls, pos: Tensor, neg: Tensor, *, fpr: float, n_boot: int, seed: int) -> "Separation":
        tpr, thr = tpr_at_fpr(pos, neg, fpr)
        auc_ci, tpr_ci = bootstrap_intervals(pos, neg, fpr=fpr, n_boot=n_boot, seed=seed)
        order = _descending(pos)
        return cls(auc(pos, neg), auc_ci, tpr, tpr_ci, thr, float(fpr), order[pos[order] > thr])

    def values(self) -> list[float]:
        return [self.auc, *self.auc_ci, self.tpr, *self.tpr_ci, self.threshold]


@dataclass(frozen=True)
class ExposureResult:
    """Per-image exposures and the membership statistics built on them (:func:`score_exposure`).

    e_train / e_heldout:           (N,) / (M,) float64 calibrated exposure of T / H' (NO_RECON_CAL: no
                                   reconstruction of the class); best_recon_*: the reconstruction reaching it.
    raw_train / raw_heldout:       raw exposure e (NO_RECON = -1.0: none); raw_best_*: its reconstruction.
    train_labels:                  (N,) int64; heldout_index: (M,) index into the held-out set of each image of H'.
    cal, raw:                      :class:`Separation` of the calibrated and of the raw score.
    matched:                       {bar: {"train": n, "heldout": n, "p": Fisher p-value}}, one-to-one matches.
    calibration, population_size:  the form used and |P|.
    exposed_distinct:              exposed training images that have a reconstruction of their own.
    recon_population:              (R,) float64 each reconstruction's best same-class population SSIM;
    recon_population_index:        (R,) int64 index into the population of that image.
    """

    e_train: Tensor
    best_recon_train: Tensor
    train_labels: Tensor
    e_heldout: Tensor
    best_recon_heldout: Tensor
    heldout_index: Tensor
    raw_train: Tensor
    raw_best_train: Tensor
    raw_heldout: Tensor
    raw_best_heldout: Tensor
    cal: Separation
    raw: Separation
    calibration: str
    population_size: int
    exposed_distinct: int
    recon_population: Tensor
    recon_population_index: Tensor
    matched: dict[float, dict[str, float]] = field(default_factory=dict)

    # the calibrated separation is the result's own (what the verdict, the gallery and the CSV read)
    auc = property(lambda self: self.cal.auc)
    auc_ci = property(lambda self: self.cal.auc_ci)
    tpr = property(lambda self: self.cal.tpr)
    tpr_ci = property(lambda self: self.cal.tpr_ci)
    threshold = property(lambda self: self.cal.threshold)
    fpr = property(lambda self: self.cal.fpr)
    exposed = property(lambda self: self.cal.exposed)
    exposed_index = property(lambda self: self.cal.exposed_index)

    @property
    def by_chance(self) -> float:
        """Training images expected above the threshold if the model had never seen them: fpr x |T|."""
        return self.fpr * int(self.e_train.numel())

    def metrics(self) -> dict[str, float]:
        """Flat dict of floats, keys :func:`exposure_keys` (self.matched's bars), for metrics.json / MLflow."""
        values = [*self.cal.values(), self.fpr, self.exposed, self.exposed_distinct, self.by_chance,
                  *self.raw.values(), self.raw.exposed]
        for m in self.matched.values():
            values += [m["train"], m["heldout"], m["p"]]
        values += [self.e_train.mean(), self.e_heldout.mean(), self.raw_train.mean(), self.raw_heldout.mean(),
                   self.population_size]
        return {k: float(v) for k, v in zip(exposure_keys(tuple(self.matched)), values, strict=True)}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per training image, by calibrated exposure descending (ties: by index): the rows of
        exposure.csv (train_index, label, exposure, raw_exposure, recon_index, population_ssim, exposed)."""
        order = _descending(self.e_train)
        pop = self.recon_population
        return [
            {"train_index": i, "label": int(self.train_labels[i]), "exposure": float(self.e_train[i]),
             "raw_exposure": float(self.raw_train[i]), "recon_index": int(self.best_recon_train[i]),
             "population_ssim": float(pop[self.best_recon_train[i]]) if self.best_recon_train[i] >= 0 else float("nan"),
             "exposed": bool(self.e_train[i] > self.threshold)}
            for i in order.tolist()
        ]

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` (header row first; ``exposed`` as True/False)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["train_index", "label", "exposure", "raw_exposure", "recon_index",
                                              "population_ssim", "exposed"])
            w.writeheader()
            w.writerows(rows)
        return path


def exposure_keys(bars: Sequence[float] = (0.4, 0.6)) -> tuple[str, ...]:
    """The keys of :meth:`ExposureResult.metrics`, in order, for the given SSIM bars."""
    sep = ("auc", "auc_lo", "auc_hi", "tpr", "tpr_lo", "tpr_hi", "threshold")
    keys = [f"exposure_{k}" for k in sep] + ["exposure_fpr", "exposed_count", "exposed_distinct", "exposed_by_chance"]
    keys += [f"raw_exposure_{k}" for k in sep] + ["raw_exposed_count"]
    for b in bars:
        keys += [f"matched_train_{bar_tag(b)}", f"matched_heldout_{bar_tag(b)}", f"matched_p_{bar_tag(b)}"]
    return tuple(keys + ["exposure_mean_train", "exposure_mean_heldout", "raw_exposure_mean_train",
                         "raw_exposure_mean_heldout", "population_size"])


def _descending(e: Tensor) -> Tensor:
    """Indices of ``e`` by value descending, ties by index ascending."""
    return torch.sort(-e, stable=True).indices


def _split(s: Any, name: str) -> tuple[Tensor, Tensor]:
    try:
        images, labels = s.images, s.labels
    except AttributeError as err:
        raise TypeError(f"{name} must have .images and .labels attributes") from err
    images = as_images(images, f"{name}.images")
    return images, as_labels(labels, images.shape[0], f"{name}.labels")


def size_matched(t_lab: Tensor, h_lab: Tensor) -> Tensor:
    """Indices of H' in the held-out set: per class c of T, its first |T_c| held-out images."""
    keep = [(h_lab == c).nonzero(as_tuple=True)[0][: int((t_lab == c).sum())] for c in torch.unique(t_lab).tolist()]
    return torch.cat(keep).sort().values


def _calibrated(sc: Any, calibration: str, images: Tensor, labels: Tensor, pop: tuple[Tensor, Tensor],
                chunk: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(e_cal, best_cal, per-image offset or None) of one scanned set, NO_RECON_CAL where no reconstruction."""
    if calibration == "recon":
        e_cal, best_cal, off = sc.e_cal.clone(), sc.best_cal, None
    else:  # "image": the image's own best population match is subtracted
        off = population_match(images, labels, *pop, chunk=chunk)[0]
        e_cal, best_cal = sc.e - off, sc.best
    e_cal[sc.best < 0] = NO_RECON_CAL
    return e_cal, best_cal, off


def score_exposure(recon: Tensor, recon_labels: Tensor, train: Any, heldout: Any, population: Any, *,
                   calibration: str = "recon", fpr: float = 0.01, bars: Sequence[float] = (0.4, 0.6),
                   n_boot: int = 1000, seed: int = 0, chunk: int = 1024) -> ExposureResult:
    """Raw and calibrated exposure of every training image and of its size-matched held-out set H'.

    Args:
        recon: (R, C, H, W) reconstructions, clamped to [0, 1] here; recon_labels: (R,) int labels.
        train, heldout, population: objects with ``.images`` (N, C, H, W) in [0, 1] and ``.labels``
            (e.g. ``tldr_core.attack.data.Split``); ``heldout`` and ``population`` were never seen by
            the classifier and are disjoint from ``train`` (the audit's P is the test split).
        calibration: "recon" or "image" (module doc of :mod:`tldr_core.scoring.exposure`).
        fpr, bars, n_boot, seed, chunk: the FPR of the threshold, the SSIM bars of the one-to-one
            counts, bootstrap resamples and seed, SSIM block size (memory bound).

    Raises:
        ValueError: empty ``recon``, T or H'; shapes; a class without population images; bad fpr,
            bars, calibration or n_boot.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    recon = as_images(recon, "recon").clamp(0.0, 1.0)
    if recon.shape[0] == 0:
        raise ValueError("score_exposure: no reconstructions")
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    (t_img, t_lab), (h_img, h_lab) = _split(train, "train"), _split(heldout, "heldout")
    pop = _split(population, "population")
    if t_img.shape[0] == 0:
        raise ValueError("score_exposure: empty training set")
    h_idx = size_matched(t_lab, h_lab)
    if h_idx.numel() == 0:
        raise ValueError("score_exposure: no held-out image of any training class")
    bars = check_bars(bars)
    _allowed(fpr, h_idx.numel())  # validate before the expensive part
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    h_img, h_lab = h_img[h_idx], h_lab[h_idx]
    pop_r, pop_r_idx = population_match(recon, rl, *pop, chunk=chunk)
    offset = pop_r if calibration == "recon" else None
    s_t = scan(recon, rl, t_img, t_lab, chunk=chunk, bars=bars, offset=offset)
    s_h = scan(recon, rl, h_img, h_lab, chunk=chunk, bars=bars, offset=offset)
    e_t, best_t, off_t = _calibrated(s_t, calibration, t_img, t_lab, pop, chunk)
    e_h, best_h, _ = _calibrated(s_h, calibration, h_img, h_lab, pop, chunk)
    cal = Separation.of(e_t, e_h, fpr=fpr, n_boot=n_boot, seed=seed)
    ex = cal.exposed_index
    distinct = calibrated_matching(recon, rl, t_img[ex], t_lab[ex], cal.threshold, recon_offset=offset,
                                   ref_offset=off_t[ex] if off_t is not None else None) if ex.numel() else 0
    n_t, n_h = int(t_lab.numel()), int(h_lab.numel())
    matched = {b: {"train": s_t.matched[b], "heldout": s_h.matched[b],
                   "p": fisher_greater(s_t.matched[b], n_t, s_h.matched[b], n_h)} for b in bars}
    return ExposureResult(
        e_train=e_t, best_recon_train=best_t, train_labels=t_lab, e_heldout=e_h, best_recon_heldout=best_h,
        heldout_index=h_idx, raw_train=s_t.e, raw_best_train=s_t.best, raw_heldout=s_h.e, raw_best_heldout=s_h.best,
        cal=cal, raw=Separation.of(s_t.e, s_h.e, fpr=fpr, n_boot=n_boot, seed=seed), calibration=calibration,
        population_size=int(pop[1].numel()), exposed_distinct=distinct, recon_population=pop_r,
        recon_population_index=pop_r_idx, matched=matched)
