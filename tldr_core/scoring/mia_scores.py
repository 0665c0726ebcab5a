"""Per-image membership scores from a classifier's logits (docs/method.md §10).

Every score is "higher = more likely a member of the training set":

- **loss** (the threshold attack of Yeom et al. 2018): ``-CE(f(x), y) = log p_y(x)``.
- **margin**: the logit margin ``f_y - logsumexp_{k != y} f_k``, which equals
  ``log p_y - log(1 - p_y)``: the "rescaled logit" of LiRA (Carlini et al. 2022). It keeps
  resolving confident images where ``log p_y`` has rounded to 0.
- **lira** (offline LiRA, Carlini et al. 2022): the target's margin ``phi`` on an image against a
  Gaussian fitted to K reference models' margins on that image, none of which trained on it:
  ``z = (phi - mu) / sigma`` and ``score = -log(1 - Phi(z))``, the one-sided test's
  ``-log p``-value (monotone in ``Phi(z)``, so it ranks as Carlini et al.'s
  ``Lambda = Phi(z)``, and keeps ranking where ``Phi(z)`` rounds to 1 in float64, z > 8.3).

``sigma`` is per image (the references' sample standard deviation on that image) when
``K >= PER_EXAMPLE_MIN_K``, else one pooled value for all images ("fixed variance"; see
:func:`lira_scores` for why 64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PER_EXAMPLE_MIN_K", "class_logits", "loss_scores", "margin_scores", "lira_scores", "LiraScores"]

#: Fewest reference models for which each image gets its own sigma (below: one pooled sigma).
PER_EXAMPLE_MIN_K = 64
_SIGMA_FLOOR = 1e-12  # a sigma of exactly 0 (identical references) would make z infinite


@torch.no_grad()
def class_logits(model: nn.Module, images: Tensor, *, batch: int = 512) -> Tensor:
    """(N, C) float64 logits on the CPU of ``model`` in eval mode (run on the model's device)."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(images[i:i + batch].to(dev)).to("cpu", torch.float64) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def _check(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.numel():
        raise ValueError(f"logits must be (N, C) with N = {labels.numel()} labels, got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError("membership scores need at least two classes")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels outside 0..{logits.shape[1] - 1}")
    return logits, labels


def loss_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """(N,) ``-cross-entropy`` of the true class, ``log softmax(f)_y`` (float64)."""
    logits, labels = _check(logits, labels)
    return torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


def margin_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """(N,) ``f_y - logsumexp_{k != y} f_k`` (float64), computed without forming ``p_y``."""
    logits, labels = _check(logits, labels)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -math.inf)
    return own - torch.logsumexp(others, dim=1)


@dataclass(frozen=True)
class LiraScores:
    """Offline LiRA's output for N images: ``score`` (-log p-value), ``z``, the fitted ``mu`` and
    ``sigma`` (N,) each, ``k`` references and whether sigma was pooled (``fixed_variance``)."""

    score: Tensor
    z: Tensor
    mu: Tensor
    sigma: Tensor
    k: int
    fixed_variance: bool


def lira_scores(target_margin: Tensor, ref_margins: Tensor, *,
                per_example_min_k: int = PER_EXAMPLE_MIN_K) -> LiraScores:
    """Offline LiRA: each image's target margin against the references' Gaussian on that image.

    Args:
        target_margin: (N,) the audited model's :func:`margin_scores`.
        ref_margins: (K, N) the same for K reference models, none trained on these N images.
        per_example_min_k: from this K on, ``sigma`` is per image; below it, pooled.

    ``mu_i`` is the references' mean on image i. Per-image ``sigma_i`` is their sample standard
    deviation (K - 1 in the denominator). The pooled ``sigma`` is ``sqrt(mean_i sigma_i^2)``, the
    within-image spread shared by all images (not the spread of all margins together, which also
    holds the differences between images). Why pool below 64: the sample standard deviation of K
    values has a relative error of about ``1 / sqrt(2 (K - 1))`` (0.5 at K = 3, 0.25 at K = 9,
    0.09 at K = 64), and an image whose sigma happens to come out small gets a large z although
    it was never trained on: false positives exactly at the low FPRs that are reported. Carlini et
    al. recommend the fixed variance for small K for this reason; from 64 on the relative error
    is under 10 %, so each image's own spread (some images vary far more across models than
    others) is worth more than the noise. With a pooled sigma the ranking is the ranking of
    ``phi - mu``: sigma only scales the z-scores.

    Raises:
        ValueError: K < 2 (no spread to estimate), shapes, NaN.
    """
    phi = torch.as_tensor(target_margin, dtype=torch.float64).reshape(-1)
    refs = torch.as_tensor(ref_margins, dtype=torch.float64)
    if refs.dim() != 2 or refs.shape[1] != phi.numel():
        raise ValueError(f"ref_margins must be (K, N) with N = {phi.numel()}, got {tuple(refs.shape)}")
    k = refs.shape[0]
    if k < 2:
        raise ValueError(f"offline LiRA needs at least 2 reference models to fit a spread, got {k}")
    if torch.isnan(phi).any() or torch.isnan(refs).any():
        raise ValueError("margins contain NaN")
    mu = refs.mean(dim=0)
    var = refs.var(dim=0, unbiased=True)
    fixed = k < per_example_min_k
    sigma = (var.mean().sqrt().expand_as(mu) if fixed else var.sqrt()).clamp_min(_SIGMA_FLOOR).clone()
    z = (phi - mu) / sigma
    score = -torch.special.log_ndtr(-z)  # -log(1 - Phi(z)), accurate in both tails
    return LiraScores(score, z, mu, sigma, k, fixed)
