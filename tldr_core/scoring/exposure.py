"""Per-image exposure: how closely the reconstructions come to each image, raw and calibrated.

With reconstructions ``R`` (each conditioned on a label) and reference images (the training set
``T``, a held-out set ``H'`` or the population ``P``, docs/method.md §7):

- raw exposure ``e(x) = max_{r in R, same class as x} SSIM(r, x)`` (:func:`exposure`). An image
  of a class with no reconstruction gets ``e = -1.0`` (:data:`NO_RECON`, the SSIM floor; its
  reconstruction index is -1): never exposed, and tied with every other such image in the AUC.
- calibrated exposure, two forms (:data:`CALIBRATIONS`), both computed identically for ``T`` and
  ``H'`` against a population ``P`` disjoint from both:
  * ``"recon"`` (the default): ``e_cal(x) = max_r [SSIM(r, x) - max_{p in P, same class} SSIM(r, p)]``:
    how much closer some reconstruction comes to ``x`` than to anything in the population. A
    class-typical image is as close to many population images as to ``x``, so it scores <= 0.
  * ``"image"``: ``e_cal(x) = e(x) - max_{p in P, same class} SSIM(x, p)``: how much better ``x``
    is reached than its own nearest population neighbour would predict.
- one-to-one matches at an SSIM bar (0.4 in Haim et al. 2022): the size of a maximum matching
  between reconstructions and reference images over same-class pairs with ``SSIM >= bar``
  (exact, Hopcroft-Karp; :func:`max_matching`), and :func:`calibrated_matching`, the same over
  pairs whose calibrated score exceeds a threshold (each exposed image needs a reconstruction of
  its own: one class-average image cannot expose many training images at once).

SSIM is :func:`tldr_core.scoring.ssim.ssim_matrix` (scikit-image's); reference images are used as
given. :mod:`tldr_core.scoring.exposure_score` builds the audit's membership statistics on these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from tldr_core.scoring.nearest import as_images, as_labels
from tldr_core.scoring.ssim import ssim_matrix

__all__ = ["NO_RECON", "CALIBRATIONS", "Scan", "exposure", "population_match", "scan", "max_matching",
           "calibrated_matching", "check_bars", "bar_tag"]

NO_RECON = -1.0  # exposure of an image whose class has no reconstruction (the SSIM floor)
CALIBRATIONS = ("recon", "image")
_TIE_TOL = 1e-6  # SSIMs closer than this are ties (float32 rounding); ties go to the lowest recon index


@dataclass(frozen=True)
class Scan:
    """One reference set scanned against the reconstructions (:func:`scan`), all (N,) on the CPU.

    e / best: raw exposure (float64) and the reconstruction reaching it (int64, -1: none);
    e_cal / best_cal: calibrated exposure and its reconstruction (equal to e / best when no
    calibration was asked for); matched: {bar: one-to-one matches at SSIM >= bar}."""

    e: Tensor
    best: Tensor
    e_cal: Tensor
    best_cal: Tensor
    matched: dict[float, int]


def _update_max(e: Tensor, best: Tensor, s: Tensor, i0: int, cols: slice) -> None:
    """Fold block ``s`` (rows i0.., columns ``cols``) into the running column maxima, in place.

    The lowest row index wins ties within the block; earlier blocks win ties against later ones."""
    top = s.max(dim=0).values
    first = (s >= top - _TIE_TOL).to(torch.uint8).argmax(dim=0)
    better = top > e[cols] + _TIE_TOL
    e[cols] = torch.where(better, top, e[cols])
    best[cols] = torch.where(better, first + i0, best[cols])


def _scan_class(r: Tensor, refs: Tensor, chunk: int, bar: float | None, offset: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Best same-class reconstruction of every reference, in (chunk x chunk) SSIM blocks.

    r: (R, C, H, W), refs: (N, C, H, W), one class; offset: (R,) float64 subtracted from each
    reconstruction's row before the calibrated maximum (None: no calibration). Returns e, best,
    e_cal, best_cal (N,) and, if ``bar`` is given, the pairs with SSIM >= bar as (recon idx, ref
    idx, SSIM) 1-D tensors (kept for the matching; memory ~ pairs, not R x N).
    """
    n = refs.shape[0]
    e = torch.full((n,), -math.inf, dtype=torch.float64)
    best = torch.zeros(n, dtype=torch.int64)
    e_cal, best_cal = e.clone(), best.clone()
    pairs: list[tuple[Tensor, Tensor, Tensor]] = []
    for j0 in range(0, n, chunk):
        ref_j = refs[j0 : j0 + chunk].to(r.device)
        for i0 in range(0, r.shape[0], chunk):
            s = ssim_matrix(r[i0 : i0 + chunk], ref_j).to("cpu", torch.float64)  # (ri, nj)
            cols = slice(j0, j0 + s.shape[1])
            _update_max(e, best, s, i0, cols)
            if offset is not None:
                _update_max(e_cal, best_cal, s - offset[i0 : i0 + s.shape[0], None], i0, cols)
            if bar is not None:
                ri, rj = (s >= bar).nonzero(as_tuple=True)
                pairs.append((ri + i0, rj + j0, s[ri, rj]))
    if offset is None:
        e_cal, best_cal = e, best
    found = tuple(torch.cat(p) for p in zip(*pairs)) if bar is not None else None
    return e, best, e_cal, best_cal, found  # type: ignore[return-value]  # N, R >= 1


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


def bar_tag(bar: float) -> str:
    """0.4 -> "040", 0.6 -> "060", 0.45 -> "045" (metric names carry no dots)."""
    return f"{round(bar * 100):03d}"


def check_bars(bars: Sequence[float]) -> tuple[float, ...]:
    bars = tuple(dict.fromkeys(float(b) for b in bars))  # unique, in order
    for b in bars:
        if not -1.0 < b <= 1.0:
            raise ValueError(f"SSIM bars must lie in (-1, 1], got {b}")
    if len({bar_tag(b) for b in bars}) < len(bars):  # metric names hold the bar to 2 decimals
        raise ValueError(f"SSIM bars must differ in their first two decimals, got {bars}")
    return bars


def _class_rows(rl: Tensor, fl: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """(class, recon indices, reference indices) of every reference class that has reconstructions."""
    out = []
    for c in torch.unique(fl).tolist():
        ri, fi = (rl == c).nonzero(as_tuple=True)[0], (fl == c).nonzero(as_tuple=True)[0]
        if ri.numel():
            out.append((c, ri, fi))
    return out


def scan(recon: Any, recon_labels: Any, refs: Any, ref_labels: Any, *, chunk: int = 1024, bars: Sequence[float] = (),
         offset: Tensor | None = None) -> Scan:
    """Raw (and, with ``offset``, "recon"-calibrated) exposure of every reference image, plus the
    one-to-one match count at each of ``bars``, in one SSIM pass.

    recon (R, C, H, W), recon_labels (R,), refs (N, C, H, W), ref_labels (N,); offset: (R,) the
    value subtracted from each reconstruction's SSIMs before the calibrated maximum (its best
    population SSIM, :func:`population_match`)."""
    recon, refs = as_images(recon, "recon"), as_images(refs, "refs")
    if recon.shape[1:] != refs.shape[1:]:
        raise ValueError(f"recon and refs differ in image shape: {tuple(recon.shape[1:])} vs {tuple(refs.shape[1:])}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    bars = check_bars(bars)
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    fl = as_labels(ref_labels, refs.shape[0], "ref_labels")
    e = torch.full((refs.shape[0],), NO_RECON, dtype=torch.float64)
    best = torch.full((refs.shape[0],), -1, dtype=torch.int64)
    e_cal, best_cal = e.clone(), best.clone()
    matched = {b: 0 for b in bars}
    for _, ri, fi in _class_rows(rl, fl):
        off = offset[ri] if offset is not None else None
        e_c, b_c, ec_c, bc_c, pairs = _scan_class(recon[ri.to(recon.device)], refs[fi], chunk,
                                                  min(bars) if bars else None, off)
        e[fi], best[fi], e_cal[fi], best_cal[fi] = e_c, ri[b_c], ec_c, ri[bc_c]
        for b in bars:
            keep = pairs[2] >= b
            matched[b] += _matching_size(pairs[0][keep], pairs[1][keep], ri.numel(), fi.numel())
    if offset is None:
        e_cal, best_cal = e, best
    return Scan(e, best, e_cal, best_cal, matched)


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
    s = scan(recon, recon_labels, refs, ref_labels, chunk=chunk)
    return s.e, s.best


def population_match(images: Tensor, labels: Tensor, population: Tensor, population_labels: Tensor, *,
                     chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Each image's best same-class match in the population: ((N,) SSIM float64, (N,) index into it).

    images (N, C, H, W) with labels (N,); population (M, C, H, W) with labels (M,). Raises
    ValueError when a class of ``labels`` has no population image (calibration needs one)."""
    labels = as_labels(labels, as_images(images, "images").shape[0], "labels")
    p_lab = as_labels(population_labels, as_images(population, "population").shape[0], "population_labels")
    missing = sorted(set(torch.unique(labels).tolist()) - set(torch.unique(p_lab).tolist()))
    if missing:
        raise ValueError(f"the population set has no image of class(es) {missing}; calibrated exposure needs at "
                         f"least one per class")
    return exposure(population, p_lab, images, labels, chunk=chunk)


def calibrated_matching(recon: Tensor, recon_labels: Tensor, refs: Tensor, ref_labels: Tensor, threshold: float, *,
                        recon_offset: Tensor | None = None, ref_offset: Tensor | None = None) -> int:
    """Maximum one-to-one matching of reconstructions to ``refs`` over same-class pairs whose
    calibrated score ``SSIM(r, x) - recon_offset[r] - ref_offset[x]`` exceeds ``threshold``.

    With ``refs`` the exposed training images, this is how many of them have a reconstruction of
    their own (a single class-average image can expose several, but match only one)."""
    recon, refs = as_images(recon, "recon"), as_images(refs, "refs")
    rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
    fl = as_labels(ref_labels, refs.shape[0], "ref_labels")
    rows, cols = [], []
    for _, ri, fi in _class_rows(rl, fl):
        s = ssim_matrix(recon[ri.to(recon.device)], refs[fi].to(recon.device)).to("cpu", torch.float64)
        if recon_offset is not None:
            s = s - recon_offset[ri][:, None]
        if ref_offset is not None:
            s = s - ref_offset[fi][None, :]
        a, b = (s > threshold).nonzero(as_tuple=True)
        rows.append(ri[a])
        cols.append(fi[b])
    if not rows:
        return 0
    return _matching_size(torch.cat(rows), torch.cat(cols), recon.shape[0], refs.shape[0])
