"""Reconstruction-quality metrics (method.md §6), computed the same way for every trial,
baseline and report.

With reconstructions ``R`` (each conditioned on a label), the classifier's training set ``T`` and
a held-out set ``H`` of the same distribution that the classifier never saw:

- ``nn_ssim(r, S) = max_{s in S, same class as r} SSIM(r, s)`` (:func:`nn_ssim`);
- ``quality = mean_r nn_ssim(r, T)``;
- ``quality_heldout = mean_r nn_ssim(r, H')`` with ``H'`` size-matched to ``T`` per class;
- ``gap = mean_r [nn_ssim(r, T) - nn_ssim(r, H')]`` with a seeded percentile-bootstrap CI;
- ``coverage`` at ``tau``, ``label_agreement``, ``diversity`` (see :func:`score_reconstructions`).

SSIM is scikit-image's (see :mod:`tldr_core.scoring.ssim`). Reconstructions are clamped to [0, 1] before
anything is scored (SSIM is computed with ``data_range=1``; values outside the range are not
images and would otherwise inflate or deflate the statistics); reference images are expected
in [0, 1] already and are used as given.

The ``train``, ``heldout`` and ``test`` arguments are duck-typed: any object with ``.images``
(N, C, H, W) float in [0, 1] and ``.labels`` (N,) int64 (e.g. ``tldr_core.attack.data.Split``).
Work is vectorised per class; nothing loops over pairs.

Nearest-neighbour search (``method``), all three reporting exact SSIMs:
- "brute": the full per-class `ssim_matrix` (the reference).
- "prefilter" (the default): every reference is ranked by a cheap estimate of SSIM (the SSIM
  map averaged over every 4th window position), and exact SSIM is computed only for references
  that can matter: each reconstruction's best-ranked few, then all whose estimate lies within a
  calibrated margin of the best exact SSIM found (or of ``tau``, for coverage). Not a proof: it
  has matched brute force on every set it was checked on (tests/test_bench.py, and each row of
  docs/benchmarks.md up to 50,000 CIFAR-sized images, where it is ~8-9x faster). Classes with
  fewer than 256 references are scored by brute force (as cheap).
- "pruned": provably the same as brute force: upper bounds of SSIM from per-window statistics
  (:func:`tldr_core.scoring.ssim.ssim_upper_bound`) rule references out and exact SSIM is computed for
  the rest, best bound first. It only saves work when reconstructions nearly copy references
  (the bound ignores structure); otherwise it costs about what brute force does. It falls back
  to brute force for small reference sets, negative pixels and non-CPU tensors.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from tldr_core.scoring.ssim import BOUND_MARGIN, WindowStats, ssim_matrix, ssim_upper_bound

__all__ = [
    "METRIC_KEYS",
    "BASELINES",
    "NearestResult",
    "nn_ssim",
    "score_reconstructions",
    "baseline_sets",
    "score_baselines",
]

#: The keys of :func:`score_reconstructions`' dict, in order (MLflow / metrics.json names).
METRIC_KEYS: tuple[str, ...] = (
    "n_recon",
    "quality",
    "quality_heldout",
    "gap",
    "gap_ci_low",
    "gap_ci_high",
    "gap_significant",
    "gap_matched_per_class",
    "coverage",
    "tau",
    "label_agreement",
    "diversity",
)

#: The names of :func:`baseline_sets`' entries, in order.
BASELINES: tuple[str, ...] = ("noise", "class_mean", "heldout_real")

_CLASSIFIER_BATCH = 256


class SplitLike(Protocol):
    images: Tensor  # (N, C, H, W) float in [0, 1]
    labels: Tensor  # (N,) int64


@dataclass
class NearestResult:
    """Same-class nearest reference image of each reconstruction, by SSIM.

    values: (R,) float64, max SSIM of each reconstruction to a same-class reference image
    index:  (R,) int64, index into the reference set of that nearest image
    """

    values: Tensor
    index: Tensor


def _images(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32)


def _labels(y: Tensor, n: int, name: str) -> Tensor:
    y = torch.as_tensor(y).detach().reshape(-1).to("cpu", torch.int64)
    if y.numel() != n:
        raise ValueError(f"{name} has {y.numel()} labels for {n} images")
    return y


def _split(s: Any, name: str) -> tuple[Tensor, Tensor]:
    try:
        images, labels = s.images, s.labels
    except AttributeError as e:
        raise TypeError(f"{name} must have .images and .labels attributes") from e
    images = _images(images, f"{name}.images")
    return images, _labels(labels, images.shape[0], f"{name}.labels")


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{what}: image shapes differ, {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")


def _class_index(labels: Tensor, c: int) -> Tensor:
    """Indices (ascending, int64, CPU) of the entries of ``labels`` equal to ``c``."""
    return (labels == c).nonzero(as_tuple=True)[0]


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
_CACHE_BYTES = 1 << 30  # window statistics of reference sets kept for reuse (training/held-out sets)
_STATS_CACHE: list[tuple[weakref.ref, tuple, WindowStats]] = []


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass
class SearchStats:
    """What pruned searches did (benchmarks read :data:`SEARCH_STATS`): pairs, exact SSIMs
    computed, classes scored by brute force after the probe, references searched."""

    pairs: int = 0
    exact_pairs: int = 0
    brute_classes: int = 0
    refs: int = 0

    def add(self, **kw: int) -> None:
        for k, v in kw.items():
            setattr(self, k, getattr(self, k) + v)


#: Running totals of every nearest-neighbour search (reset it by assigning a new SearchStats()).
SEARCH_STATS = SearchStats()


class _Ref:
    """A reference image set (all classes). Window statistics of a subset (one class) are computed
    when first needed and cached across calls while the caller's tensor lives unmodified (the same
    training and held-out sets are scored many times per trial: reconstructions, nearest images,
    baselines)."""

    def __init__(self, original: Any, images: Tensor) -> None:
        self.original, self.images = original, images

    def stats(self, idx: Tensor) -> WindowStats:
        o = self.original
        if not isinstance(o, Tensor):
            return WindowStats(self.images[idx])
        key = (tuple(o.shape), o._version, idx.numel(), hash(idx.numpy().tobytes()))
        for k, (ref, entry_key, st) in enumerate(_STATS_CACHE):
            if ref() is o and entry_key == key:
                _STATS_CACHE.insert(0, _STATS_CACHE.pop(k))
                return st
        st = WindowStats(self.images[idx])
        if st.nbytes <= _CACHE_BYTES:
            _STATS_CACHE.insert(0, (weakref.ref(o), key, st))
            while sum(e[2].nbytes for e in _STATS_CACHE) > _CACHE_BYTES:
                _STATS_CACHE.pop()
        return st


def _prunable(r: Tensor, ref: Tensor) -> bool:
    return (r.device.type == "cpu" and ref.device.type == "cpu" and ref.shape[0] >= _PRUNE_MIN_REFS
            and bool((r.min() >= 0) & (ref.min() >= 0))
            and bool(torch.isfinite(r).all() & torch.isfinite(ref).all()))


def _nearest(m: Tensor) -> tuple[Tensor, Tensor]:
    """(max of each row, the lowest column index within _TIE_TOL of it) of m (n_r, n) float64."""
    top = m.max(dim=1).values
    j = (m >= (top - _TIE_TOL)[:, None]).to(torch.int8).argmax(dim=1)
    return top, j


def _search(r: Tensor, ref: _Ref, idx: Tensor, tau: float | None, method: str
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Same-class search of reconstructions ``r`` (n_r) in the references ``ref.images[idx]`` (n_t).

    Returns (values (n_r,) float64, index (n_r,) int64 into ``idx``, covered (n_t,) bool or None):
    each r's max SSIM and its arg max (ties within 1e-6 to the lowest index), and with ``tau``
    whether some r reaches SSIM >= tau with each reference. "pruned" returns what "brute" does.
    """
    images = ref.images[idx.to(ref.images.device)]
    if method == "prefilter" and images.shape[0] >= _PREFILTER_MIN_REFS:
        return _search_prefilter(r, images.to(r.device), tau)
    if method != "pruned" or not _prunable(r, images):
        m = ssim_matrix(r, images.to(r.device)).to("cpu", torch.float64)
        SEARCH_STATS.add(pairs=m.numel(), exact_pairs=m.numel(), refs=m.shape[1], brute_classes=1)
        return (*_nearest(m), (m.max(dim=0).values >= tau) if tau is not None else None)
    return _search_pruned(r, images, lambda: ref.stats(idx), tau)


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

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return (*_nearest(self.exact), self.covered if self.tau is not None else None)


def _search_pruned(r: Tensor, ref: Tensor, ref_stats: Callable[[], WindowStats], tau: float | None
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    n_r, n_t = r.shape[0], ref.shape[0]
    sr = WindowStats(r)
    cols = _ExactColumns(r, ref, tau)
    exact, done = cols.exact, cols.done
    bound = torch.full((n_r, n_t), math.inf, dtype=torch.float64)

    def alive() -> Tensor:
        best = exact.max(dim=1).values
        need = (bound >= (best - BOUND_MARGIN)[:, None]).any(dim=0)
        if tau is not None:
            need |= bound.max(dim=0).values >= tau - BOUND_MARGIN
        return need & ~done

    def seed(upto: int) -> None:  # exact SSIM of each reconstruction's two best-bounded references
        b = bound[:, :upto].masked_fill(done[:upto], -math.inf)
        cols.evaluate(b.topk(min(2, upto), dim=1).indices.flatten().unique())

    p = min(n_t, _PROBE)
    bound[:, :p] = ssim_upper_bound(sr, WindowStats(ref[:p]))
    hopeless = tau is not None and (bound[:, :p].max(dim=0).values >= tau - BOUND_MARGIN).float().mean() > _PROBE_KEEP
    if not hopeless:
        seed(p)
    if hopeless or alive()[:p].float().mean() > _PROBE_KEEP:  # the bound cannot prune here: brute force is cheaper
        m = ssim_matrix(r, ref).to(torch.float64)
        SEARCH_STATS.add(pairs=m.numel(), exact_pairs=m.numel() + cols.n_exact, refs=n_t, brute_classes=1)
        return (*_nearest(m), (m.max(dim=0).values >= tau) if tau is not None else None)
    if p < n_t:
        bound[:, p:] = ssim_upper_bound(sr, ref_stats().take(slice(p, n_t)))
        seed(n_t)
    size = _FIRST_ROUND
    while (keep := alive()).any():  # exact SSIM for what the bound cannot rule out, best bound first
        idx = keep.nonzero(as_tuple=True)[0]
        best = exact.max(dim=1).values
        prio = (bound[:, idx] - best[:, None]).max(dim=0).values
        if tau is not None:
            prio = torch.maximum(prio, bound[:, idx].max(dim=0).values - tau)
        cols.evaluate(idx[prio.argsort(descending=True)[:size]])
        size = min(2 * size, _MAX_ROUND)
    SEARCH_STATS.add(pairs=n_r * n_t, exact_pairs=cols.n_exact, refs=n_t)
    return cols.result()


def _search_prefilter(r: Tensor, ref: Tensor, tau: float | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rank every reference by a cheap SSIM estimate, then compute exact SSIM where it can matter.

    The estimate is the SSIM map averaged over every 4th window position in each direction
    (``ssim_matrix(stride=4)``, ~1/14 of the windows at 32x32). Each reconstruction's 8 best-ranked
    references are scored exactly first; their (exact - estimate) residuals calibrate a margin
    (6 standard deviations, at least 0.03); then every reference whose estimate comes within that
    margin of some reconstruction's best exact SSIM (or of ``tau``, for coverage) is scored exactly
    too. Reported values are always exact SSIMs (the same `ssim_matrix` call brute force makes);
    the only risk is that a true nearest neighbour's estimate falls more than the margin below
    it. That is checked empirically against brute force, not proven (tests/test_bench.py,
    docs/benchmarks.md); use method "brute" (or the provable but slower "pruned") where that
    matters more than time.
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
    SEARCH_STATS.add(pairs=n_r * n_t, exact_pairs=cols.n_exact, refs=n_t)
    return cols.result()


def nn_ssim(recon: Tensor, recon_labels: Tensor, ref: Tensor, ref_labels: Tensor, *,
            method: str = "prefilter") -> NearestResult:
    """Same-class nearest neighbour of each reconstruction in ``ref``, by SSIM.

    Args:
        recon: (R, C, H, W) images (used as given; `score_reconstructions` clamps first).
        recon_labels: (R,) int labels.
        ref: (N, C, H, W) reference images.
        ref_labels: (N,) int labels.
        method: "prefilter" (default), "pruned" or "brute" (module doc).

    Returns:
        NearestResult with ``values`` (R,) float64 and ``index`` (R,) int64 (into ``ref``), on
        CPU. Ties (SSIMs within 1e-6, float32 rounding) go to the lowest reference index.

    Raises:
        ValueError: if a class present in ``recon_labels`` has no reference image.
    """
    _check_method(method)
    recon = _images(recon, "recon")
    ref_set = _Ref(ref, _images(ref, "ref"))
    ref = ref_set.images
    _check_same_shape(recon, ref, "nn_ssim")
    rl = _labels(recon_labels, recon.shape[0], "recon_labels")
    fl = _labels(ref_labels, ref.shape[0], "ref_labels")
    values = torch.zeros(recon.shape[0], dtype=torch.float64)
    index = torch.zeros(recon.shape[0], dtype=torch.int64)
    for c in torch.unique(rl).tolist():
        ri, fi = _class_index(rl, c), _class_index(fl, c)
        if fi.numel() == 0:
            raise ValueError(f"nn_ssim: class {c} has reconstructions but no reference images")
        v, j, _ = _search(recon[ri.to(recon.device)], ref_set, fi, None, method)
        values[ri] = v
        index[ri] = fi[j.cpu()]
    return NearestResult(values=values, index=index)


def _bootstrap_ci(d: Tensor, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(d): resample entries with replacement ``n_boot`` times."""
    g = torch.Generator().manual_seed(seed)
    n = d.numel()
    means = torch.empty(n_boot, dtype=torch.float64)
    step = max(1, 2**22 // max(n, 1))  # bound the (step, n) index matrix to ~32 MB
    for b0 in range(0, n_boot, step):
        nb = min(step, n_boot - b0)
        idx = torch.randint(n, (nb, n), generator=g)
        means[b0 : b0 + nb] = d[idx].mean(dim=1)
    alpha = (1.0 - level) / 2
    q = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


@torch.no_grad()
def _label_agreement(classifier: torch.nn.Module, recon: Tensor, labels: Tensor) -> float:
    """Fraction of ``recon`` whose classifier argmax equals ``labels``.

    Eval mode, no grad, batches of 256, on the classifier's device; the module's train/eval
    mode is restored afterwards.
    """
    p = next(iter(classifier.parameters()), None)
    device = p.device if p is not None else recon.device
    dtype = p.dtype if p is not None and p.is_floating_point() else recon.dtype
    was_training = classifier.training
    classifier.eval()
    try:
        hits = 0
        for i in range(0, recon.shape[0], _CLASSIFIER_BATCH):
            out = classifier(recon[i : i + _CLASSIFIER_BATCH].to(device, dtype))
            pred = out.argmax(dim=1).cpu()
            hits += int((pred == labels[i : i + _CLASSIFIER_BATCH]).sum())
    finally:
        classifier.train(was_training)
    return hits / recon.shape[0]


def score_reconstructions(
    recon: Tensor,
    recon_labels: Tensor,
    train: SplitLike,
    heldout: SplitLike,
    *,
    classifier: torch.nn.Module | None = None,
    tau: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    method: str = "prefilter",
) -> dict[str, float]:
    """All reconstruction metrics of method.md §6, as a flat dict of floats.

    Args:
        recon: (R, C, H, W) reconstructions; clamped to [0, 1] before scoring (also before the
            classifier sees them for ``label_agreement``).
        recon_labels: (R,) int64 labels each reconstruction was conditioned on.
        train: the classifier's training set T (``.images`` (N, C, H, W), ``.labels`` (N,)).
        heldout: held-out images H of the same distribution, never seen by the classifier.
        classifier: the frozen classifier (logits (B, K)); None -> ``label_agreement`` is NaN.
        tau: SSIM threshold of ``coverage``.
        n_boot: bootstrap resamples for the gap CI (>= 1).
        seed: bootstrap seed.
        method: nearest-neighbour search: "prefilter" (default), "pruned" or "brute" (module doc).

    Returns (keys exactly :data:`METRIC_KEYS`):
        n_recon:          R.
        quality:          mean_r nn_ssim(r, T).
        quality_heldout:  mean_r nn_ssim(r, H'), where H' holds, per class c, the first k_c
                          held-out images of class c (in order), k_c = |T_c|.
        gap:              mean_r [nn_ssim(r, T_m) - nn_ssim(r, H')] (paired per reconstruction).
                          Normally T_m = T. If H has fewer than k_c images of some class, H' keeps
                          all of them and T_m is T reduced to its first |H'_c| images of that
                          class, for the gap only (then gap != quality - quality_heldout).
        gap_ci_low, gap_ci_high: 95% percentile bootstrap CI of ``gap`` (reconstructions
                          resampled with replacement ``n_boot`` times, seeded).
        gap_significant:  1.0 if gap_ci_low > 0 (CI excludes 0 and lies above it), else 0.0.
        gap_matched_per_class: the smallest per-class size used for the gap over the classes of
                          ``recon_labels`` (min_c |H'_c|); equals T's per-class size when H is
                          large enough and T is balanced. Always present.
        coverage:         fraction of T for which some same-class r has SSIM(r, t) >= tau
                          (T images of classes without reconstructions count as not covered).
        tau:              the threshold used.
        label_agreement:  fraction of R whose classifier argmax equals recon_labels (NaN if no
                          classifier).
        diversity:        1 - mean SSIM between distinct reconstructions of the same class,
                          averaged (unweighted) over classes with >= 2 reconstructions; NaN if
                          there is no such class.

    Raises:
        ValueError: empty ``recon``; a class of ``recon_labels`` with no training or no held-out
            image; mismatched shapes; n_boot < 1.
    """
    _check_method(method)
    recon = _images(recon, "recon").clamp(0.0, 1.0)
    rl = _labels(recon_labels, recon.shape[0], "recon_labels")
    t_img, t_lab = _split(train, "train")
    h_img, h_lab = _split(heldout, "heldout")
    t_set, h_set = _Ref(getattr(train, "images", None), t_img), _Ref(getattr(heldout, "images", None), h_img)
    _check_same_shape(recon, t_img, "recon vs train")
    _check_same_shape(recon, h_img, "recon vs heldout")
    n = recon.shape[0]
    if n == 0:
        raise ValueError("score_reconstructions: no reconstructions")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    dev = recon.device

    nn_t = torch.zeros(n, dtype=torch.float64)  # nn_ssim(r, T)
    nn_tm = torch.zeros(n, dtype=torch.float64)  # nn_ssim(r, T_m), size-matched T for the gap
    nn_h = torch.zeros(n, dtype=torch.float64)  # nn_ssim(r, H')
    covered = torch.zeros(t_img.shape[0], dtype=torch.bool)
    matched: list[int] = []
    div_per_class: list[float] = []
    for c in torch.unique(rl).tolist():
        ri, ti, hi = _class_index(rl, c), _class_index(t_lab, c), _class_index(h_lab, c)
        if ti.numel() == 0:
            raise ValueError(f"class {c} has reconstructions but no training images")
        if hi.numel() == 0:
            raise ValueError(f"class {c} has reconstructions but no held-out images")
        m = min(ti.numel(), hi.numel())
        r_c = recon[ri.to(dev)]
        if method == "brute":  # the reference: full matrices
            m_t = ssim_matrix(r_c, t_img[ti].to(dev)).to("cpu", torch.float64)  # (r_c, |T_c|)
            m_h = ssim_matrix(r_c, h_img[hi[:m]].to(dev)).to("cpu", torch.float64)  # (r_c, m)
            nn_t[ri] = m_t.max(dim=1).values
            nn_tm[ri] = m_t[:, :m].max(dim=1).values
            nn_h[ri] = m_h.max(dim=1).values
            covered[ti] = m_t.max(dim=0).values >= tau
        else:
            nn_t[ri], _, covered[ti] = _search(r_c, t_set, ti, tau, method)
            nn_tm[ri] = nn_t[ri] if m == ti.numel() else _search(r_c, t_set, ti[:m], None, method)[0]
            nn_h[ri] = _search(r_c, h_set, hi[:m], None, method)[0]
        matched.append(m)
        k = ri.numel()
        if k >= 2:
            m_r = ssim_matrix(r_c, r_c).to("cpu", torch.float64)
            off_diag = (m_r.sum() - m_r.diagonal().sum()) / (k * (k - 1))
            div_per_class.append(float(off_diag))

    d = nn_tm - nn_h
    ci_low, ci_high = _bootstrap_ci(d, n_boot, seed)
    label_agreement = math.nan if classifier is None else _label_agreement(classifier, recon, rl)
    diversity = 1.0 - sum(div_per_class) / len(div_per_class) if div_per_class else math.nan
    out = {
        "n_recon": float(n),
        "quality": float(nn_t.mean()),
        "quality_heldout": float(nn_h.mean()),
        "gap": float(d.mean()),
        "gap_ci_low": ci_low,
        "gap_ci_high": ci_high,
        "gap_significant": 1.0 if ci_low > 0 else 0.0,
        "gap_matched_per_class": float(min(matched)),
        "coverage": float(covered.double().mean()),
        "tau": float(tau),
        "label_agreement": float(label_agreement),
        "diversity": float(diversity),
    }
    assert tuple(out) == METRIC_KEYS
    return out


def baseline_sets(
    train: SplitLike, test: SplitLike, num_classes: int, per_class: int, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Reference "reconstructions" to score next to real ones (method.md §6).

    Returns {name: (images (M, C, H, W) float32 in [0, 1], labels (M,) int64)}, on CPU:
        noise:        uniform [0, 1) images, ``per_class`` per class, labels cycled
                      (0, 1, ..., K-1, 0, 1, ...), seeded by ``seed``.
        class_mean:   each class's mean training image, ``per_class`` copies per class, labels
                      cycled the same way (nn_ssim of a repeated image equals one copy's).
        heldout_real: ``per_class`` real images per class drawn without replacement (seeded)
                      from ``test`` (not from the held-out set H, which would match itself),
                      grouped by class. A class with fewer test images contributes all it has
                      (with a warning).

    Raises:
        ValueError: a class in range(num_classes) with no training image, or no test image.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes}, {per_class}")
    t_img, t_lab = _split(train, "train")
    s_img, s_lab = _split(test, "test")
    t_img, s_img = t_img.cpu(), s_img.cpu()
    _check_same_shape(t_img, s_img, "train vs test")
    shape = tuple(t_img.shape[1:])
    cycled = torch.arange(num_classes, dtype=torch.int64).repeat(per_class)

    noise = torch.rand((cycled.numel(), *shape), generator=torch.Generator().manual_seed(seed))

    means = torch.empty((num_classes, *shape), dtype=torch.float32)
    for c in range(num_classes):
        ti = _class_index(t_lab, c)
        if ti.numel() == 0:
            raise ValueError(f"baseline_sets: class {c} has no training images")
        means[c] = t_img[ti].mean(dim=0)
    class_mean = means[cycled]

    g = torch.Generator().manual_seed(seed + 1)
    real_idx: list[Tensor] = []
    for c in range(num_classes):
        si = _class_index(s_lab, c)
        if si.numel() == 0:
            raise ValueError(f"baseline_sets: class {c} has no test images")
        if si.numel() < per_class:
            warnings.warn(
                f"baseline_sets: class {c} has only {si.numel()} test images (< per_class={per_class})",
                stacklevel=2,
            )
        real_idx.append(si[torch.randperm(si.numel(), generator=g)[:per_class]])
    ri = torch.cat(real_idx)

    return {
        "noise": (noise, cycled.clone()),
        "class_mean": (class_mean, cycled.clone()),
        "heldout_real": (s_img[ri].clone(), s_lab[ri].clone()),
    }


def score_baselines(
    train: SplitLike,
    heldout: SplitLike,
    test: SplitLike,
    num_classes: int,
    per_class: int,
    *,
    classifier: torch.nn.Module | None = None,
    tau: float = 0.5,
    seed: int = 0,
    n_boot: int = 1000,
    method: str = "prefilter",
) -> dict[str, dict[str, float]]:
    """Each of :func:`baseline_sets` scored with :func:`score_reconstructions` (same code path).

    Returns {baseline name: metrics dict with keys :data:`METRIC_KEYS`}.
    """
    sets = baseline_sets(train, test, num_classes, per_class, seed=seed)
    return {
        name: score_reconstructions(
            images, labels, train, heldout, classifier=classifier, tau=tau, n_boot=n_boot, seed=seed, method=method
        )
        for name, (images, labels) in sets.items()
    }
