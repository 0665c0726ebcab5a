"""Structural similarity (SSIM), batched, matching scikit-image.

`ssim(x, y)` reproduces ``skimage.metrics.structural_similarity(a, b, data_range=1.0,
channel_axis=0)`` with its defaults, pair by pair and without a Python loop:

- a ``win_size`` x ``win_size`` uniform window (7 by default), K1 = 0.01, K2 = 0.03;
- sample covariances (``use_sample_covariance=True``): variances and covariance are scaled by
  ``NP / (NP - 1)`` with ``NP = win_size ** 2``;
- the SSIM map is averaged over the *valid* region only, i.e. after cropping
  ``(win_size - 1) // 2`` pixels at every border (scikit-image filters with reflection and then
  crops; the cropped map is exactly what a 'valid' ``avg_pool2d(kernel=win_size, stride=1)``
  gives);
- for several channels, the mean of the per-channel SSIMs.

Window shrinking (a deviation from scikit-image, which raises instead): if an image side is
smaller than ``win_size``, the window shrinks to the largest odd number <= min(H, W). 8x8 digits
keep the default 7; a 5x6 image uses 5. Use :func:`effective_win_size` to see which is used.

`ssim_matrix(a, b)` gives the SSIM of every ``a_i`` against every ``b_j``. Per-image local means
and variances are computed once per image; only the local covariance is per pair. It is computed
as one batched matrix product over window positions,
``cov_ij(p) = sum_k (a_i(p, k) - mu_a_i(p)) * b_j(p, k) / (NP - 1)`` (window patches of ``a``
mean-centred, those of ``b`` raw: the centred patches sum to zero), which is algebraically
``NP/(NP-1) * (pool(a_i b_j) - mu_a_i mu_b_j)`` but without its catastrophic cancellation, so the
per-pair work runs in float32 and still agrees with the float64 `ssim` to ~1e-7. The rest of the
SSIM map is elementwise on preallocated buffers, chunked so that they stay under ``chunk_bytes``
(64 MiB on CPU, 256 MiB on CUDA), under ``torch.no_grad()``. The smaller of the two sets is the
held (centred) side. Nothing here is meant to be differentiated.

Timing (2-core CPU, 1 thread, float32): 100 x 1000 images take ~0.25 s at 1x28x28 and ~1.2 s at
3x32x32.

Upper bound (for exact nearest-neighbour search in `tldr_core.scoring.nearest`): :func:`ssim_upper_bound`
gives, for images with non-negative pixels, ``U[i, j] >= ssim_matrix(a, b)[i, j]`` from per-image
window means and variances only (:class:`WindowStats`), at a fraction of the exact cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssim", "ssim_matrix", "effective_win_size", "WindowStats", "ssim_upper_bound", "BOUND_MARGIN"]

K1 = 0.01
K2 = 0.03


def effective_win_size(height: int, width: int, win_size: int = 7) -> int:
    """The window actually used for ``height`` x ``width`` images.

    ``win_size`` must be odd and >= 1. If it exceeds min(height, width) it shrinks to the largest
    odd number <= min(height, width) (scikit-image would raise instead).
    """
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    side = min(int(height), int(width))
    if side < 1:
        raise ValueError(f"images must be at least 1x1, got {height}x{width}")
    if win_size > side:
        win_size = side if side % 2 == 1 else side - 1
    return win_size


def _check_images(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:  # a single (C, H, W) image
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W) (or (C, H, W)), got shape {tuple(x.shape)}")
    return x


def _constants(data_range: float) -> tuple[float, float]:
    return (K1 * data_range) ** 2, (K2 * data_range) ** 2


@torch.no_grad()
def ssim(x: Tensor, y: Tensor, *, win_size: int = 7, data_range: float = 1.0) -> Tensor:
    """SSIM of each pair ``(x[n], y[n])``.

    Args:
        x, y: (N, C, H, W) float images (a single (C, H, W) image is accepted too).
        win_size: odd side of the uniform window (shrunk for small images, see module doc).
        data_range: value range of the images (1.0 for [0, 1]).

    Returns:
        (N,) tensor in ``x``'s floating dtype (float32 for non-float input). Computed in float64.
    """
    x = _check_images(x, "x")
    y = _check_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    n = x.shape[0]
    if n == 0:
        return torch.empty(0, dtype=out_dtype, device=x.device)
    w = effective_win_size(x.shape[-2], x.shape[-1], win_size)
    c1, c2 = _constants(data_range)
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    cov_norm = w * w / (w * w - 1) if w > 1 else 1.0

    def pool(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, kernel_size=w, stride=1)

    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).to(out_dtype)


def _local_stats(x: Tensor, w: int, stride: int = 1) -> tuple[Tensor, Tensor]:
    """Local means and sample variances, (N, C, H', W') each (windows every ``stride`` pixels).

    float64 for SSIM itself; float32 for the strided estimate (ranking only, where the input casts
    and products in float64 would be most of its cost)."""
    x = x.to(torch.float64 if stride == 1 else torch.float32)
    k = w * w
    mu = F.avg_pool2d(x, kernel_size=w, stride=stride)
    var = F.avg_pool2d(x * x, kernel_size=w, stride=stride) - mu * mu
    if k > 1:
        var = var * (k / (k - 1))
    return mu, var


def _to_cl_n(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, C, H', W') -> (C*L, N) contiguous in ``dtype``."""
    n, c = t.shape[:2]
    return t.reshape(n, c, -1).permute(1, 2, 0).reshape(-1, n).to(dtype).contiguous()


def _patches(x: Tensor, w: int, stride: int = 1) -> Tensor:
    """(N, C, H, W) -> (C*L, N, w*w) window patches (one copy, no im2col)."""
    n, c = x.shape[:2]
    v = x.unfold(2, w, stride).unfold(3, w, stride)  # (N, C, H', W', w, w) view
    return v.permute(1, 2, 3, 0, 4, 5).reshape(-1, n, w * w)


def _held_side(x: Tensor, w: int, dtype: torch.dtype, cov_scale: float, c1: float, c2: float,
               stride: int = 1) -> dict[str, Tensor]:
    """Per-image terms for the side whose patches are mean-centred (the 'a' side).

    x: (N, C, H, W). With L window positions and k = w*w:
        cen:  (C*L, N, k)  centred patches, pre-multiplied by 2/(k-1) (so cen @ patches_b^T = 2*cov)
        mu2:  (C*L, N, 1)  2 * local mean
        lum:  (C*L, N, 1)  local mean^2 + C1
        var:  (C*L, N, 1)  local sample variance + C2
    Centring is done in float64 before casting to ``dtype``.
    """
    mu, var = _local_stats(x, w, stride)
    n = x.shape[0]
    cen = torch.empty(mu.shape[1] * mu[0, 0].numel(), n, w * w, dtype=dtype, device=x.device)
    step = 64  # float64 temporaries for at most this many images at a time
    for i in range(0, n, step):
        block = _patches(x[i : i + step].to(torch.float64), w, stride)
        block -= _to_cl_n(mu[i : i + step], torch.float64).unsqueeze(2)
        cen[:, i : i + step] = block * cov_scale
    return {
        "cen": cen,
        "mu2": _to_cl_n(2 * mu, dtype).unsqueeze(2),
        "lum": _to_cl_n(mu * mu + c1, dtype).unsqueeze(2),
        "var": _to_cl_n(var + c2, dtype).unsqueeze(2),
    }


def _other_side(x: Tensor, w: int, dtype: torch.dtype, stride: int = 1) -> dict[str, Tensor]:
    """Per-image terms for the 'b' side: raw (uncentred) patches (C*L, N, k) and local mean,
    mean^2 and sample variance as (C*L, 1, N). Uncentred patches suffice because the a-side
    patches sum to zero over each window."""
    mu, var = _local_stats(x, w, stride)
    return {
        "patches": _patches(x.to(dtype), w, stride),
        "mu": _to_cl_n(mu, dtype).unsqueeze(1),
        "mu_sq": _to_cl_n(mu * mu, dtype).unsqueeze(1),
        "var": _to_cl_n(var, dtype).unsqueeze(1),
    }


_PATCH_BYTES = 256 * 2**20  # bound on the held (a-side) patch block


@torch.no_grad()
def ssim_matrix(a: Tensor, b: Tensor, *, win_size: int = 7, data_range: float = 1.0, chunk_bytes: int | None = None,
                dtype: torch.dtype = torch.float32, stride: int = 1) -> Tensor:
    """SSIM of every ``a[i]`` against every ``b[j]``.

    Args:
        a: (A, C, H, W) float images.
        b: (B, C, H, W) float images (same C, H, W; moved to ``a``'s device).
        win_size, data_range: as in :func:`ssim`.
        chunk_bytes: rough bound on the per-pair temporaries of one chunk (3 maps of
            C*L*ca*cb values). Default: 64 MiB on CPU (cache- and allocator-friendly; larger
            chunks are slower there), 256 MiB on CUDA. The held window patches of the smaller set
            are bounded separately by 256 MiB per block.
        dtype: compute dtype of the per-pair work. float32 agrees with the float64 `ssim` to
            ~1e-7 thanks to the centred-patch covariance; torch.float64 is ~1.5-2x slower.
        stride: 1 (default) is SSIM. ``s > 1`` averages the SSIM map over every s-th window
            position in each direction only: ~s² times cheaper, an estimate of SSIM used to rank
            candidates (`tldr_core.scoring.nearest`' "prefilter" search), never reported as SSIM.

    Returns:
        (A, B) tensor of SSIM values in ``dtype``, on ``a``'s device;
        ``ssim_matrix(a, b)[i, i] == ssim(a, b)[i]`` to ~1e-7 when A == B.
    """
    a = _check_images(a, "a")
    b = _check_images(b, "b").to(a.device)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b images differ in shape: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    na, nb = a.shape[0], b.shape[0]
    if na > nb:  # hold the smaller set's patches; SSIM is symmetric
        return ssim_matrix(b, a, win_size=win_size, data_range=data_range, chunk_bytes=chunk_bytes, dtype=dtype,
                           stride=stride).T
    out = torch.empty(na, nb, dtype=dtype, device=a.device)
    if na == 0 or nb == 0:
        return out
    if chunk_bytes is None:
        chunk_bytes = 256 * 2**20 if a.device.type == "cuda" else 64 * 2**20
    c, h, wd = a.shape[1:]
    w = effective_win_size(h, wd, win_size)
    k = w * w
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    L = ((h - w) // stride + 1) * ((wd - w) // stride + 1)
    cl = c * L
    c1, c2 = _constants(data_range)
    cov_scale = 2.0 / (k - 1) if k > 1 else 2.0  # 2 * vxy = 2 * sum_k(centred a * b) / (k - 1)
    esize = torch.empty((), dtype=dtype).element_size()
    ca, cb = _block_sizes(na, nb, cl * k * esize, cl * esize, int(chunk_bytes))
    bufs = torch.empty(3, cl * ca * cb, dtype=dtype, device=a.device)
    for i0 in range(0, na, ca):
        sa = _held_side(a[i0 : i0 + ca], w, dtype, cov_scale, c1, c2, stride)
        for j0 in range(0, nb, cb):
            sb = _other_side(b[j0 : j0 + cb], w, dtype, stride)
            block = _pair_block(sa, sb, bufs, c1, c2)
            out[i0 : i0 + block.shape[0], j0 : j0 + block.shape[1]] = block
    return out


def _block_sizes(na: int, nb: int, patch_bytes: int, map_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(ca, cb): held a-side images per block (their patches take ``patch_bytes`` each, bounded by
    _PATCH_BYTES) and b-side images per chunk (3 maps of ``map_bytes`` per pair, bounded by chunk_bytes)."""
    ca = max(1, min(na, _PATCH_BYTES // patch_bytes))  # held a-side block
    # per-pair work: 3 preallocated maps of cl * ca * cb values (reused: no allocator churn)
    cb = max(1, min(nb, chunk_bytes // (3 * map_bytes * ca)))
    if cb < 8 and ca > 1:  # keep the batched products wide enough on the b side too
        cb = min(nb, 8)
        ca = max(1, min(ca, chunk_bytes // (3 * map_bytes * cb)))
    return ca, cb


def _pair_block(sa: dict[str, Tensor], sb: dict[str, Tensor], bufs: Tensor, c1: float, c2: float) -> Tensor:
    """(n_a, n_b) SSIMs of a held block against a chunk, computed in the preallocated ``bufs`` (3, >= C*L*n_a*n_b)."""
    cl, n_a, n_b = sa["cen"].shape[0], sa["cen"].shape[1], sb["patches"].shape[1]
    num, den, lum = (buf[: cl * n_a * n_b].view(cl, n_a, n_b) for buf in bufs)
    torch.bmm(sa["cen"], sb["patches"].transpose(1, 2), out=num)  # 2 * cov
    num.add_(c2)  # 2 vxy + C2
    torch.add(sa["var"], sb["var"], out=den)  # vx + vy + C2
    torch.mul(sa["mu2"], sb["mu"], out=lum)  # 2 ux uy
    lum.add_(c1)
    num.mul_(lum)
    torch.add(sa["lum"], sb["mu_sq"], out=lum)  # ux^2 + uy^2 + C1
    den.mul_(lum)
    num.div_(den)
    # mean over channels and positions == mean of per-channel means (equal L per channel)
    return num.mean(dim=0)


# ---- a provable upper bound of SSIM (exact nearest-neighbour pruning) -----------------------------

#: Absolute margin added to every bound comparison: covers the float32 rounding of evaluating the
#: bound (a few 1e-7 per window term), with more than 100x headroom.
BOUND_MARGIN = 1e-4

_BOUND_CHUNK_BYTES = 32 * 2**20


class WindowStats:
    """Per-window local means and sample variances of a set of images, for :func:`ssim_upper_bound`.

    mu, var: (C*L, N) float32, computed in float64 exactly as `ssim_matrix` does (var clamped at 0).
    """

    def __init__(self, x: Tensor, win_size: int = 7) -> None:
        x = _check_images(x, "x")
        n, c, h, w = x.shape
        self.n, self.shape = n, (c, h, w)
        self.win = effective_win_size(h, w, win_size)
        mu, var = _local_stats(x, self.win)
        self.mu = _to_cl_n(mu, torch.float32)
        self.var = _to_cl_n(var.clamp_min_(0), torch.float32)

    def take(self, idx: Tensor | slice) -> "WindowStats":
        """The statistics of images ``idx`` (index tensor or slice); nothing is recomputed."""
        out = WindowStats.__new__(WindowStats)
        out.shape, out.win = self.shape, self.win
        out.mu, out.var = self.mu[:, idx], self.var[:, idx]
        out.n = out.mu.shape[1]
        return out

    @property
    def nbytes(self) -> int:
        return self.mu.numel() * 4 * 2


def _bound_features(s: WindowStats, side: str, c1: float, c2: float) -> Tensor:
    """(C*L, 8, N) features whose products with the other side's give, per window,
    numerator (2 mu_a mu_b + C1)(2 sd_a sd_b + C2) [rank 4] and denominator
    (mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2) [rank 4]."""
    mu, var = s.mu, s.var
    sd = var.sqrt()
    one = torch.ones_like(mu)
    if side == "a":
        a1, a2 = mu * mu + c1, var + c2
        feats = [4 * mu * sd, 2 * c2 * mu, 2 * c1 * sd, torch.full_like(mu, c1 * c2), a1 * a2, a1, a2, one]
    else:
        m2 = mu * mu
        feats = [mu * sd, mu, sd, one, one, var, m2, m2 * var]
    return torch.stack(feats, dim=1)


@torch.no_grad()
def ssim_upper_bound(sa: WindowStats, sb: WindowStats, *, data_range: float = 1.0) -> Tensor:
    """(A, B) float32 ``U`` with ``U[i, j] + BOUND_MARGIN >= ssim_matrix(a, b)[i, j]``.

    Per window SSIM = l * cs with l = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) and
    cs = (2 cov + C2) / (var_a + var_b + C2). For images with non-negative pixels l >= 0, and
    |cov| <= sd_a sd_b (Cauchy-Schwarz), so SSIM <= mean over windows of
    l * (2 sd_a sd_b + C2) / (var_a + var_b + C2): per-image statistics only, no per-pair
    covariance. Evaluated as one batched product per window position (numerator and denominator
    are rank 4 in the two images' statistics), a division and a mean.

    ``sa``, ``sb``: :class:`WindowStats` of the two sets (same image shape and window). The caller
    checks that the pixels are non-negative.
    """
    if sa.shape != sb.shape or sa.win != sb.win:
        raise ValueError("ssim_upper_bound: statistics of differently shaped images")
    c1, c2 = _constants(data_range)
    out = torch.empty(sa.n, sb.n, dtype=torch.float32)
    if sa.n == 0 or sb.n == 0:
        return out
    fa = _bound_features(sa, "a", c1, c2)  # (CL, 8, A)
    cl = fa.shape[0]
    ca = max(1, min(sa.n, 256))
    cb = max(1, min(sb.n, _BOUND_CHUNK_BYTES // (4 * cl * 2 * ca)))
    for i0 in range(0, sa.n, ca):
        na = min(ca, sa.n - i0)
        x = torch.zeros(cl, 2 * na, 8)  # block-diagonal: rows 0..na numerators, na..2na denominators
        x[:, :na, :4] = fa[:, :4, i0 : i0 + na].transpose(1, 2)
        x[:, na:, 4:] = fa[:, 4:, i0 : i0 + na].transpose(1, 2)
        for j0 in range(0, sb.n, cb):
            part = sb.take(slice(j0, min(j0 + cb, sb.n)))
            o = torch.bmm(x, _bound_features(part, "b", c1, c2))  # (CL, 2 na, nb)
            out[i0 : i0 + na, j0 : j0 + part.n] = (o[:, :na] / o[:, na:]).mean(dim=0)
    return out
