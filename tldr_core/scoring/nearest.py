"""Same-class nearest-neighbour search by SSIM: each reconstruction's most similar reference image.

A :class:`ReferenceIndex` is one reference set (all classes: a training or held-out set) plus the
per-class window statistics the "pruned" search computed from it so far; build it once and pass it
to every search of that set to reuse them (the statistics are recomputed when the images change in
place). A :class:`SearchStats` the caller owns counts what the searches did (benchmarks read it).

Three searches (``method``), all reporting exact SSIMs (:func:`tldr_core.scoring.ssim.ssim_matrix`):

- "brute": the full per-class SSIM matrix (the reference).
- "prefilter" (the default): every reference is ranked by a cheap estimate of SSIM (the SSIM map
  averaged over every 4th window position), and exact SSIM is computed only for references that
  can matter: each reconstruction's best-ranked few, then all whose estimate lies within a
  calibrated margin of the best exact SSIM found (or of ``tau``, for coverage). Not a proof: it has
  matched brute force on every set it was checked on (tests/e2e/test_bench.py, and each row of
  docs/benchmarks.md up to 50,000 CIFAR-sized images, where it is ~8-9x faster). Classes with
  fewer than 256 references are scored by brute force (as cheap).
- "pruned": provably the same as brute force: upper bounds of SSIM from per-window statistics
  (:func:`tldr_core.scoring.ssim.ssim_upper_bound`) rule references out and exact SSIM is computed
  for the rest, best bound first. It only saves work when reconstructions nearly copy references
  (the bound ignores structure); otherwise it costs about what brute force does. It falls back to
  brute force for small reference sets, negative pixels and non-CPU tensors.

Ties (SSIMs within 1e-6, float32 rounding) go to the lowest reference index in every search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tldr_core.scoring.ssim import BOUND_MARGIN, WindowStats, ssim_matrix, ssim_upper_bound

__all__ = ["METHODS", "NearestResult", "ReferenceIndex", "SearchStats", "check_method", "nn_ssim", "search"]

METHODS: tuple[str, ...] = ("prefilter", "pruned", "brute")

_TIE_TOL = 1e-6  # SSIMs closer than this are ties (float32 rounding); ties go to the lowest index
_PRUNE_MIN_REFS = 512  # below this many references per class brute force is as cheap
_PROBE = 256  # references on which pruning must prove itself before the bound is computed for all
_PROBE_KEEP = 0.5  # if the probe leaves more than this fraction, the class is scored by brute force
_FIRST_ROUND = 32  # exact columns in the first refinement round (doubling each round, up to _MAX_ROUND)
_MAX_ROUND = 1024
_PREFILTER_MIN_REFS = 256  # below this many references per class brute force is as cheap
_PREFILTER_STRIDE = 4  # the ranking estimate averages the SSIM map over every 4th window position (~1/14)
_PREFILTER_TOPK = 8  # each reconstruction's best-ranked references scored exactly first (calibration)
_PREFILTER_SIGMAS = 6.0  # margin = this many standard deviations of (exact - estimate) seen in calibration
_PREFILTER_MIN_MARGIN = 0.03
_CACHE_BYTES = 1 << 30  # window statistics one ReferenceIndex keeps for reuse

Found = tuple[Tensor, Tensor, "Tensor | None"]  # (values (n_r,) float64, index (n_r,) int64, covered (n_t,) bool)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def as_images(x: Any, name: str) -> Tensor:
    """(N, C, H, W) float32 view of ``x`` (no copy when it already is one)."""
    x = torch.as_tensor(x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32)


def as_labels(y: Any, n: int, name: str) -> Tensor:
    """(n,) int64 labels on the CPU."""
    y = torch.as_tensor(y).detach().reshape(-1).to("cpu", torch.int64)
    if y.numel() != n:
        raise ValueError(f"{name} has {y.numel()} labels for {n} images")
    return y


def class_index(labels: Tensor, c: int) -> Tensor:
    """Indices (ascending, int64, CPU) of the entries of ``labels`` equal to ``c``."""
    return (labels == c).nonzero(as_tuple=True)[0]


def check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{what}: image shapes differ, {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")


@dataclass
class NearestResult:
    """Same-class nearest reference image of each reconstruction, by SSIM.

    values: (R,) float64, max SSIM of each reconstruction to a same-class reference image
    index:  (R,) int64, index into the reference set of that nearest image
    """

    values: Tensor
    index: Tensor


@dataclass
class SearchStats:
    """Running totals of searches: (reconstruction, reference) pairs searched, exact SSIMs computed,
    classes scored by brute force, references searched. Pass one to accumulate; reset by making a new one."""

    pairs: int = 0
    exact_pairs: int = 0
    brute_classes: int = 0
    refs: int = 0

    def add(self, **kw: int) -> None:
        for k, v in kw.items():
            setattr(self, k, getattr(self, k) + v)


class ReferenceIndex:
    """A reference image set (all classes) and the window statistics of its subsets computed so far.

    images: (N, C, H, W) float32 (a view of the caller's tensor when it already is float32);
    labels: (N,) int64 on the CPU. Duck-types as a split (``.images``, ``.labels``), so it can be
    passed wherever a training or held-out set is expected. Statistics of a subset (one class, or
    its first k images) are computed when first needed, kept up to ``cache_bytes`` (least recently
    used dropped first), and dropped when the images are modified in place.
    """

    def __init__(self, images: Any, labels: Any, *, name: str = "ref", cache_bytes: int = _CACHE_BYTES) -> None:
        self.images = as_images(images, f"{name}.images")
        self.labels = as_labels(labels, self.images.shape[0], f"{name}.labels")
        self.cache_bytes = cache_bytes
        self._version = self.images._version
        self._cache: list[tuple[bytes, WindowStats]] = []

    @classmethod
    def of(cls, split: Any, name: str = "ref") -> "ReferenceIndex":
        """``split`` itself if it is a ReferenceIndex, else a new index of its ``.images`` and ``.labels``."""
        if isinstance(split, ReferenceIndex):
            return split
        try:
            images, labels = split.images, split.labels
        except AttributeError as e:
            raise TypeError(f"{name} must have .images and .labels attributes") from e
        return cls(images, labels, name=name)

    def __len__(self) -> int:
        return self.images.shape[0]

    def stats(self, idx: Tensor) -> WindowStats:
        """WindowStats of ``images[idx]`` (idx: int64 CPU indices)."""
        if self.images._version != self._version:  # changed in place since the statistics were made
            self._cache.clear()
            self._version = self.images._version
        key = idx.numpy().tobytes()
        for k, (entry_key, st) in enumerate(self._cache):
            if entry_key == key:
                self._cache.insert(0, self._cache.pop(k))
                return st
        st = WindowStats(self.images[idx.to(self.images.device)])
        if st.nbytes <= self.cache_bytes:
            self._cache.insert(0, (key, st))
            while sum(e[1].nbytes for e in self._cache) > self.cache_bytes:
                self._cache.pop()
        return st

    def nearest(self, recon: Any, recon_labels: Any, *, method: str = "prefilter",
                stats: SearchStats | None = None) -> NearestResult:
        """Same-class nearest neighbour in this set of each reconstruction (see :func:`nn_ssim`)."""
        check_method(method)
        recon = as_images(recon, "recon")
        check_same_shape(recon, self.images, "nn_ssim")
        rl = as_labels(recon_labels, recon.shape[0], "recon_labels")
        values = torch.zeros(recon.shape[0], dtype=torch.float64)
        index = torch.zeros(recon.shape[0], dtype=torch.int64)
        for c in torch.unique(rl).tolist():
            ri, fi = class_index(rl, c), class_index(self.labels, c)
            if fi.numel() == 0:
                raise ValueError(f"nn_ssim: class {c} has reconstructions but no reference images")
            v, j, _ = search(recon[ri.to(recon.device)], self, fi, None, method, stats)
            values[ri] = v
            index[ri] = fi[j.cpu()]
        return NearestResult(values=values, index=index)


def nn_ssim(recon: Tensor, recon_labels: Tensor, ref: Tensor, ref_labels: Tensor, *, method: str = "prefilter",
            stats: SearchStats | None = None) -> NearestResult:
    """Same-class nearest neighbour of each reconstruction in ``ref``, by SSIM.

    Args:
        recon: (R, C, H, W) images (used as given; `score_reconstructions` clamps first).
        recon_labels: (R,) int labels.
        ref: (N, C, H, W) reference images; ref_labels: (N,) int labels.
        method: "prefilter" (default), "pruned" or "brute" (module doc).
        stats: counters to add this search's work to (optional).

    Returns NearestResult with ``values`` (R,) float64 and ``index`` (R,) int64 (into ``ref``), on
    the CPU. Raises ValueError if a class of ``recon_labels`` has no reference image. To search the
    same set repeatedly, build a :class:`ReferenceIndex` once and call its ``nearest``.
    """
    check_method(method)
    return ReferenceIndex(ref, ref_labels).nearest(recon, recon_labels, method=method, stats=stats)


def _prunable(r: Tensor, ref: Tensor) -> bool:
    return (r.device.type == "cpu" and ref.device.type == "cpu" and ref.shape[0] >= _PRUNE_MIN_REFS
            and bool((r.min() >= 0) & (ref.min() >= 0))
            and bool(torch.isfinite(r).all() & torch.isfinite(ref).all()))


def _nearest(m: Tensor) -> tuple[Tensor, Tensor]:
    """(max of each row, the lowest column index within _TIE_TOL of it) of m (n_r, n) float64."""
    top = m.max(dim=1).values
    j = (m >= (top - _TIE_TOL)[:, None]).to(torch.int8).argmax(dim=1)
    return top, j


def _brute(r: Tensor, images: Tensor, tau: float | None, stats: SearchStats, extra_exact: int = 0) -> Found:
    m = ssim_matrix(r, images.to(r.device)).to("cpu", torch.float64)
    stats.add(pairs=m.numel(), exact_pairs=m.numel() + extra_exact, refs=m.shape[1], brute_classes=1)
    return (*_nearest(m), (m.max(dim=0).values >= tau) if tau is not None else None)


def search(r: Tensor, ref: ReferenceIndex, idx: Tensor, tau: float | None, method: str,
           stats: SearchStats | None = None) -> Found:
    """Same-class search of reconstructions ``r`` (n_r) in the references ``ref.images[idx]`` (n_t).

    Returns (values (n_r,) float64, index (n_r,) int64 into ``idx``, covered (n_t,) bool or None):
    each r's max SSIM and its arg max (ties within 1e-6 to the lowest index), and with ``tau``
    whether some r reaches SSIM >= tau with each reference. "pruned" returns what "brute" does.
    """
    stats = stats if stats is not None else SearchStats()
    images = ref.images[idx.to(ref.images.device)]
    if method == "prefilter" and images.shape[0] >= _PREFILTER_MIN_REFS:
        return _search_prefilter(r, images.to(r.device), tau, stats)
    if method != "pruned" or not _prunable(r, images):
        return _brute(r, images, tau, stats)
    return _search_pruned(r, images, ref, idx, tau, stats)


class _ExactColumns:
    """Exact SSIMs of reconstructions ``r`` against the references computed so far, column by column
    (shared by the pruned and prefilter searches).

    exact: (n_r, n_t) float64, -inf where not computed; done: (n_t,) bool; covered: (n_t,) bool,
    whether some r reaches ``tau`` (when given); n_exact: exact SSIMs computed.
    """

    def __init__(self, r: Tensor, ref: Tensor, tau: float | None) -> None:
        self.r, self.ref, self.tau = r, ref, tau
        n_r, n_t = r.shape[0], ref.shape[0]
        self.exact = torch.full((n_r, n_t), -math.inf, dtype=torch.float64)
        self.done = torch.zeros(n_t, dtype=torch.bool)
        self.covered = torch.zeros(n_t, dtype=torch.bool)
        self.n_exact = 0

    def evaluate(self, cols: Tensor) -> None:
        n_r = self.r.shape[0]
        if 0 < cols.numel() < n_r:  # keep the reconstructions the held side of ssim_matrix, as brute force does
            rest = (~self.done).nonzero(as_tuple=True)[0]
            cols = torch.cat([cols, rest[~torch.isin(rest, cols)][: n_r - cols.numel()]])
        if cols.numel() == 0:
            return
        cols = cols.sort().values
        # the same call brute force makes, on fewer columns
        m = ssim_matrix(self.r, self.ref[cols.to(self.ref.device)]).to("cpu", torch.float64)
        self.exact[:, cols] = m
        if self.tau is not None:
            self.covered[cols] = m.max(dim=0).values >= self.tau
        self.done[cols] = True
        self.n_exact += m.numel()

    def result(self) -> Found:
        return (*_nearest(self.exact), self.covered if self.tau is not None else None)


class _Pruning:
    """The pruned search's state: upper bounds (n_r, n_t) of SSIM and the exact columns so far."""

    def __init__(self, r: Tensor, ref: Tensor, tau: float | None) -> None:
        self.tau, self.sr = tau, WindowStats(r)
        self.cols = _ExactColumns(r, ref, tau)
        self.bound = torch.full((r.shape[0], ref.shape[0]), math.inf, dtype=torch.float64)

    def alive(self) -> Tensor:
        """(n_t,) bool: references not yet computed whose bound could still beat a best or reach tau."""
        best = self.cols.exact.max(dim=1).values
        need = (self.bound >= (best - BOUND_MARGIN)[:, None]).any(dim=0)
        if self.tau is not None:
            need |= self.bound.max(dim=0).values >= self.tau - BOUND_MARGIN
        return need & ~self.cols.done

    def seed(self, upto: int) -> None:
        """Exact SSIM of each reconstruction's two best-bounded references among the first ``upto``."""
        b = self.bound[:, :upto].masked_fill(self.cols.done[:upto], -math.inf)
        self.cols.evaluate(b.topk(min(2, upto), dim=1).indices.flatten().unique())

    def refine(self) -> None:
        """Exact SSIM for what the bound cannot rule out, best bound first, in doubling rounds."""
        size = _FIRST_ROUND
        while (keep := self.alive()).any():
            idx = keep.nonzero(as_tuple=True)[0]
            best = self.cols.exact.max(dim=1).values
            prio = (self.bound[:, idx] - best[:, None]).max(dim=0).values
            if self.tau is not None:
                prio = torch.maximum(prio, self.bound[:, idx].max(dim=0).values - self.tau)
            self.cols.evaluate(idx[prio.argsort(descending=True)[:size]])
            size = min(2 * size, _MAX_ROUND)


def _search_pruned(r: Tensor, images: Tensor, ref: ReferenceIndex, idx: Tensor, tau: float | None,
                   stats: SearchStats) -> Found:
    """Exact search with SSIM upper bounds; a probe of the first 256 references decides whether the
    bound can prune here at all (else brute force, which is cheaper than a useless bound)."""
    n_r, n_t = r.shape[0], images.shape[0]
    s = _Pruning(r, images, tau)
    p = min(n_t, _PROBE)
    s.bound[:, :p] = ssim_upper_bound(s.sr, WindowStats(images[:p]))
    hopeless = tau is not None and (s.bound[:, :p].max(dim=0).values >= tau - BOUND_MARGIN).float().mean() > _PROBE_KEEP
    if not hopeless:
        s.seed(p)
    if hopeless or s.alive()[:p].float().mean() > _PROBE_KEEP:
        return _brute(r, images, tau, stats, extra_exact=s.cols.n_exact)
    if p < n_t:
        s.bound[:, p:] = ssim_upper_bound(s.sr, ref.stats(idx).take(slice(p, n_t)))
        s.seed(n_t)
    s.refine()
    stats.add(pairs=n_r * n_t, exact_pairs=s.cols.n_exact, refs=n_t)
    return s.cols.result()


def _search_prefilter(r: Tensor, ref: Tensor, tau: float | None, stats: SearchStats) -> Found:
    """Rank every reference by a cheap SSIM estimate, then compute exact SSIM where it can matter.

    The estimate is the SSIM map averaged over every 4th window position in each direction
    (``ssim_matrix(stride=4)``, ~1/14 of the windows at 32x32). Each reconstruction's 8 best-ranked
    references are scored exactly first; their (exact - estimate) residuals calibrate a margin
    (6 standard deviations, at least 0.03); then every reference whose estimate comes within that
    margin of some reconstruction's best exact SSIM (or of ``tau``, for coverage) is scored exactly
    too. Reported values are always exact SSIMs; the only risk is that a true nearest neighbour's
    estimate falls more than the margin below it, checked empirically against brute force, not
    proven: use method "brute" (or the provable but slower "pruned") where that matters more than time.
    """
    n_r, n_t = r.shape[0], ref.shape[0]
    est = ssim_matrix(r, ref, stride=_PREFILTER_STRIDE).to("cpu", torch.float64)
    cols = _ExactColumns(r, ref, tau)
    cols.evaluate(est.topk(min(_PREFILTER_TOPK, n_t), dim=1).indices.flatten().unique())
    resid = (cols.exact[:, cols.done] - est[:, cols.done]).flatten()
    margin = max(_PREFILTER_MIN_MARGIN, _PREFILTER_SIGMAS * float(resid.std()) if resid.numel() > 1 else 0.0)
    need = (est >= (cols.exact.max(dim=1).values - margin)[:, None]).any(dim=0)
    if tau is not None:
        need |= est.max(dim=0).values >= tau - margin
    cols.evaluate((need & ~cols.done).nonzero(as_tuple=True)[0])
    stats.add(pairs=n_r * n_t, exact_pairs=cols.n_exact, refs=n_t)
    return cols.result()
