"""Per-training-image exposure: leakage as a membership question answered by the reconstructions.

With reconstructions ``R`` (each conditioned on a label), the training set ``T`` and a held-out set
``H`` of the same distribution that the classifier never saw:

- ``e(x) = max_{r in R, same class as x} SSIM(r, x)``, for every ``x`` in ``T`` and in ``H'``
  (:func:`exposure`). ``H'`` is size-matched to ``T``: per class ``c`` of ``T`` the first
  ``|T_c|`` held-out images of class ``c`` (in order; all of them if ``H`` has fewer).
  An image of a class with no reconstruction gets ``e = -1.0`` (:data:`NO_RECON`, the lowest
  possible SSIM; its reconstruction index is -1): it is never exposed, and ties with every
  other such image in the AUC. NaN would poison every mean and rank.
- **AUC** of ``e(T)`` against ``e(H')``: the Mann-Whitney statistic, ``P(e(t) > e(h))`` with
  ties counted 1/2 (:func:`auc`). 0.5 = the reconstructions are no closer to training images
  than to unseen ones.
- **TPR at FPR** (1 % by default, the operating point of membership-inference audits, e.g.
  Carlini et al. 2022, "LiRA"): the threshold is the ``(k+1)``-th largest held-out exposure
  with ``k = floor(fpr * |H'|)``, i.e. the smallest value that at most ``fpr`` of ``H'``
  *strictly* exceed; TPR is the fraction of ``T`` strictly above it (ties with the threshold
  are not exposed), and those training images are the **exposed** ones (:func:`tpr_at_fpr`).
  With 100 held-out images and 1 %, the threshold is the second largest held-out exposure.
- 95 % percentile-bootstrap intervals of both (training and held-out images resampled
  independently, seeded; :func:`bootstrap_intervals`).
- **One-to-one matches** at an SSIM bar (0.4 in Haim et al. 2022): the size of a maximum
  matching between reconstructions and reference images over same-class pairs with
  ``SSIM >= bar`` (exact, Hopcroft-Karp), for ``T`` and for ``H'`` (:func:`max_matching`). A real
  unseen MNIST digit already reaches ~0.68, so only the difference between the two counts
  says something.

SSIM is :func:`tldr_core.scoring.ssim.ssim_matrix` (scikit-image's). :func:`score_exposure`
clamps reconstructions to [0, 1] first, as the other reconstruction metrics do; reference images
are used as given.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from tldr_core.scoring.membership import _allowed, auc, bootstrap_intervals, fpr_threshold, tpr_at_fpr
from tldr_core.scoring.nearest import as_images, as_labels
from tldr_core.scoring.ssim import ssim_matrix

__all__ = ["NO_RECON", "exposure", "max_matching", "auc", "fpr_threshold", "tpr_at_fpr", "bootstrap_intervals",
           "exposure_keys", "ExposureResult", "score_exposure"]

NO_RECON = -1.0  # exposure of an image whose class has no reconstruction (the SSIM floor)
_TIE_TOL = 1e-6  # SSIMs closer than this are ties (float32 rounding); ties go to the lowest recon index


# ----------------------------------------------------------------------------- exposure + matching


def _scan_class(r: Tensor, refs: Tensor, chunk: int, bar: float | None
                ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Best same-class reconstruction of every reference, in (chunk x chunk) SSIM blocks.

    r: (R, C, H, W), refs: (N, C, H, W), one class. Returns e (N,) float64, best (N,) int64 into
    ``r`` (lowest index among ties), and, if ``bar`` is given, the pairs with SSIM >= bar as
    (recon idx, ref idx, SSIM) 1-D tensors (kept for the matching; memory ~ pairs, not R x N).
    """
    n = refs.shape[0]
    e = torch.full((n,), -math.inf, dtype=torch.float64)
    best = torch.zeros(n, dtype=torch.int64)
    pairs: list[tuple[Tensor, Tensor, Tensor]] = []
    for j0 in range(0, n, chunk):
        ref_j = refs[j0 : j0 + chunk].to(r.device)
        for i0 in range(0, r.shape[0], chunk):
            s = ssim_matrix(r[i0 : i0 + chunk], ref_j).to("cpu", torch.float64)  # (ri, nj)
            top = s.max(dim=0).values
            first = (s >= top - _TIE_TOL).to(torch.uint8).argmax(dim=0)  # lowest index among ties
            cols = slice(j0, j0 + s.shape[1])
            better = top > e[cols] + _TIE_TOL  # earlier row blocks win ties
            e[cols] = torch.where(better, top, e[cols])
            best[cols] = torch.where(better, first + i0, best[cols])
            if bar is not None:
                ri, rj = (s >= bar).nonzero(as_tuple=True)
                pairs.append((ri + i0, rj + j0, s[ri, rj]))
    if bar is None:
        return e, best, None
    return e, best, tuple(torch.cat(p) for p in zip(*pairs))  # type: ignore[return-value]  # N, R >= 1


def _matching_size(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> int:
    """Size of a maximum matching of the bipartite graph with edges (rows[k], cols[k]).

    Exact (Hopcroft-Karp, scipy.sparse.csgraph.maximum_bipartite_matching)."""
    if rows.numel() == 0:
        return 0
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    graph = csr_matrix((np.ones(rows.numel(), dtype=np.int8), (rows.numpy(), cols.numpy())), shape=(n_rows, n_cols))
    graph.sum_duplicates()
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def max_matching(sim: Tensor, bar: float) -> int:
    """Largest number of one-to-one (row, column) pairs with ``sim >= bar`` (exact, not greedy).

    sim: (R, N) similarities (e.g. SSIM of reconstructions x reference images); pairs that must
    not match (other class) should be set below ``bar`` (e.g. -inf). Greedy best-first would give
    1 for [[0.9, 0.5], [0.8, 0.1]] at bar 0.4; the answer is 2.
    """
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if sim.dim() != 2:
        raise ValueError(f"sim must be (R, N), got shape {tuple(sim.shape)}")
    ri, rj = (sim >= bar).nonzero(as_tuple=True)
    return _matching_size(ri, rj, sim.shape[0], sim.shape[1])


def _check_bars(bars: Sequence[float]) -> tuple[float, ...]:
    bars = tuple(dict.fromkeys(float(b) for b in bars))  # unique, in order
    for b in bars:
        if not -1.0 < b <= 1.0:
            raise ValueError(f"SSIM bars must lie in (-1, 1], got {b}")
    if len({_bar_tag(b) for b in bars}) < len(bars):  # metric names hold the bar to 2 decimals
        raise ValueError(f"SSIM bars must differ in their first two decimals, got {bars}")
    return bars


def _scan(recon: Tensor, recon_labels: Tensor, refs: Tensor, ref_labels: Tensor, chunk: int,
          bars: Sequence[float] = ()) -> tuple[Tensor, Tensor, dict[float, int]]:
    """:func:`exposure` plus the one-to-one match count at each of ``bars`` (one SSIM pass)."""
    recon, refs = as_images(recon, "recon"), as_images(refs, "refs")
    if recon.shape[1:] != refs.shape[1:]:
        raise ValueError(f"recon and refs differ in image shape: {tuple(recon.shape[1:])} vs {tuple(refs.shape[1:])}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    bars = _check_bars(bars)
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    fl = as_labels(ref_labels, refs.shape[0], "ref_labels")
    e = torch.full((refs.shape[0],), NO_RECON, dtype=torch.float64)
    best = torch.full((refs.shape[0],), -1, dtype=torch.int64)
    matched = {b: 0 for b in bars}
    for c in torch.unique(fl).tolist():
        ri, fi = (rl == c).nonzero(as_tuple=True)[0], (fl == c).nonzero(as_tuple=True)[0]
        if ri.numel() == 0:
            continue  # no reconstruction of this class: e = NO_RECON, best = -1
        e_c, best_c, pairs = _scan_class(recon[ri.to(recon.device)], refs[fi], chunk, min(bars) if bars else None)
        e[fi], best[fi] = e_c, ri[best_c]
        for b in bars:
            keep = pairs[2] >= b
            matched[b] += _matching_size(pairs[0][keep], pairs[1][keep], ri.numel(), fi.numel())
    return e, best, matched


def exposure(recon: Tensor, recon_labels: Tensor, refs: Tensor, ref_labels: Tensor, *,
             chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Best SSIM of any same-class reconstruction to each reference image.

    Args:
        recon: (R, C, H, W) reconstructions (used as given).
        recon_labels: (R,) int labels.
        refs: (N, C, H, W) reference images (training or held-out).
        ref_labels: (N,) int labels.
        chunk: SSIM is computed in blocks of at most chunk x chunk pairs (bounded memory).

    Returns:
        e: (N,) float64 on CPU, ``NO_RECON`` (-1.0) where the class has no reconstruction.
        best_recon: (N,) int64 index into ``recon`` reaching e (lowest among ties within 1e-6),
            -1 where the class has no reconstruction.
    """
    e, best, _ = _scan(recon, recon_labels, refs, ref_labels, chunk)
    return e, best


# ----------------------------------------------------------------------------- AUC / TPR@FPR


# ----------------------------------------------------------------------------- the audit's result


def _bar_tag(bar: float) -> str:
    """0.4 -> "040", 0.6 -> "060", 0.45 -> "045" (metric names carry no dots)."""
    return f"{round(bar * 100):03d}"


def exposure_keys(bars: Sequence[float] = (0.4, 0.6)) -> tuple[str, ...]:
    """The keys of :meth:`ExposureResult.metrics`, in order, for the given SSIM bars."""
    keys = ["exposure_auc", "exposure_auc_lo", "exposure_auc_hi", "exposure_tpr", "exposure_tpr_lo",
            "exposure_tpr_hi", "exposure_threshold", "exposure_fpr", "exposed_count"]
    for b in bars:
        keys += [f"matched_train_{_bar_tag(b)}", f"matched_heldout_{_bar_tag(b)}"]
    return tuple(keys + ["exposure_mean_train", "exposure_mean_heldout"])


@dataclass(frozen=True)
class ExposureResult:
    """Per-image exposures and the membership statistics built on them (:func:`score_exposure`).

    e_train:            (N,) float64, e(t) for every training image (NO_RECON = -1.0: no
                        reconstruction of its class).
    best_recon_train:   (N,) int64, the reconstruction reaching e(t) (-1: none).
    train_labels:       (N,) int64, the training labels.
    e_heldout:          (M,) float64, e(h) for every image of H'.
    best_recon_heldout: (M,) int64, the reconstruction reaching e(h) (-1: none).
    heldout_index:      (M,) int64, index into the held-out set of each image of H'.
    auc, auc_ci:        AUC of e_train vs e_heldout and its bootstrap interval (lo, hi).
    tpr, tpr_ci:        fraction of T strictly above ``threshold`` and its bootstrap interval.
    threshold:          the (k+1)-th largest e(h), k = floor(fpr * M).
    fpr:                the false-positive rate the threshold was set at.
    exposed:            number of exposed training images (e(t) > threshold) = tpr * N.
    exposed_index:      (exposed,) int64 training indices of those, by e(t) descending (ties: by index).
    matched:            {bar: {"train": n, "heldout": n}}, one-to-one matches at SSIM >= bar.
    """

    e_train: Tensor
    best_recon_train: Tensor
    train_labels: Tensor
    e_heldout: Tensor
    best_recon_heldout: Tensor
    heldout_index: Tensor
    auc: float
    auc_ci: tuple[float, float]
    tpr: float
    tpr_ci: tuple[float, float]
    threshold: float
    fpr: float
    exposed: int
    exposed_index: Tensor
    matched: dict[float, dict[str, int]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat dict of floats, keys :func:`exposure_keys` (self.matched's bars), for metrics.json / MLflow."""
        values = [self.auc, *self.auc_ci, self.tpr, *self.tpr_ci, self.threshold, self.fpr, self.exposed]
        for m in self.matched.values():
            values += [m["train"], m["heldout"]]
        values += [self.e_train.mean(), self.e_heldout.mean()]
        return {k: float(v) for k, v in zip(exposure_keys(tuple(self.matched)), values, strict=True)}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per training image (train_index, label, exposure, recon_index, exposed),
        by exposure descending (ties: by index): the rows of exposure.csv."""
        order = _descending(self.e_train)
        return [
            {"train_index": i, "label": int(self.train_labels[i]), "exposure": float(self.e_train[i]),
             "recon_index": int(self.best_recon_train[i]), "exposed": bool(self.e_train[i] > self.threshold)}
            for i in order.tolist()
        ]

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` (header row first; ``exposed`` as True/False)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["train_index", "label", "exposure", "recon_index", "exposed"])
            w.writeheader()
            w.writerows(self.rows())
        return path


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


def _size_matched(t_lab: Tensor, h_lab: Tensor) -> Tensor:
    """Indices of H' in the held-out set: per class c of T, its first |T_c| held-out images."""
    keep = [(h_lab == c).nonzero(as_tuple=True)[0][: int((t_lab == c).sum())] for c in torch.unique(t_lab).tolist()]
    return torch.cat(keep).sort().values


def score_exposure(recon: Tensor, recon_labels: Tensor, train: Any, heldout: Any, *, fpr: float = 0.01,
                   bars: Sequence[float] = (0.4, 0.6), n_boot: int = 1000, seed: int = 0,
                   chunk: int = 1024) -> ExposureResult:
    """Exposure of every training image and of its size-matched held-out counterpart set H'.

    Args:
        recon: (R, C, H, W) reconstructions, clamped to [0, 1] here.
        recon_labels: (R,) int labels each reconstruction was conditioned on.
        train, heldout: objects with ``.images`` (N, C, H, W) in [0, 1] and ``.labels`` (N,)
            (e.g. ``tldr_core.attack.data.Split``); ``heldout`` was never seen by the classifier.
        fpr: false-positive rate of the exposure threshold (on H').
        bars: SSIM bars of the one-to-one match counts.
        n_boot, seed: bootstrap resamples and seed of the intervals.
        chunk: SSIM block size (memory bound), see :func:`exposure`.

    Raises:
        ValueError: empty ``recon``; shapes; H' empty; bad fpr, bars or n_boot.
    """
    recon = as_images(recon, "recon").clamp(0.0, 1.0)
    if recon.shape[0] == 0:
        raise ValueError("score_exposure: no reconstructions")
    t_img, t_lab = _split(train, "train")
    h_img, h_lab = _split(heldout, "heldout")
    if t_img.shape[0] == 0:
        raise ValueError("score_exposure: empty training set")
    h_idx = _size_matched(t_lab, h_lab)
    if h_idx.numel() == 0:
        raise ValueError("score_exposure: no held-out image of any training class")
    bars = _check_bars(bars)
    _allowed(fpr, h_idx.numel())  # validate before the expensive part
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    e_t, best_t, m_t = _scan(recon, recon_labels, t_img, t_lab, chunk, bars)
    e_h, best_h, m_h = _scan(recon, recon_labels, h_img[h_idx], h_lab[h_idx], chunk, bars)
    tpr, thr = tpr_at_fpr(e_t, e_h, fpr)
    auc_ci, tpr_ci = bootstrap_intervals(e_t, e_h, fpr=fpr, n_boot=n_boot, seed=seed)
    order = _descending(e_t)
    exposed_index = order[e_t[order] > thr]
    return ExposureResult(
        e_train=e_t, best_recon_train=best_t, train_labels=t_lab, e_heldout=e_h, best_recon_heldout=best_h,
        heldout_index=h_idx, auc=auc(e_t, e_h), auc_ci=auc_ci, tpr=tpr, tpr_ci=tpr_ci, threshold=thr, fpr=float(fpr),
        exposed=int(exposed_index.numel()), exposed_index=exposed_index,
        matched={b: {"train": m_t[b], "heldout": m_h[b]} for b in bars},
    )
