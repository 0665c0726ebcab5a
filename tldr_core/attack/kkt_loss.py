"""The KKT attack's loss (docs/method.md §8): the stationarity residual of candidate images and its
gradient, the smoothed ReLU that gives the candidates useful second-order gradients, and a functional
(torch.func) form of one step that `torch.compile` can compile.

residual = mean over parameter tensors p of ‖θ_p − g_p‖² / ‖θ_p‖²,   g = (1/m) Σⱼ λⱼ ∇θ mⱼ(xⱼ)

Smoothed ReLU. ∇θ m depends on the candidate through ReLU gates whose derivative is a step, so the
candidate would get almost no gradient through them; during extraction only, ReLU's (LeakyReLU's)
backward uses sigmoid(α·x) (slope + (1 − slope)·sigmoid(α·x)) while its forward value is unchanged.
Smooth activations (softplus, SiLU, GELU) are left as they are: their gradients are already smooth.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from tldr_core.attack.config import ConfigError

LAYERS = ("all", "first", "fc")


# ---- smoothed ReLU ------------------------------------------------------------------------------

class _SmoothReLU(torch.autograd.Function):
    """Forward: exact (leaky) ReLU. Backward: slope + (1 − slope)·sigmoid(α·x).

    The backward is written in differentiable torch ops on the saved input, so autograd can
    differentiate it again (double backward: the loss is a function of a gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float, slope: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.slope = alpha, slope
        return F.leaky_relu(x, slope) if slope else F.relu(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, = ctx.saved_tensors
        gate = torch.sigmoid(ctx.alpha * x)
        if ctx.slope:
            gate = ctx.slope + (1 - ctx.slope) * gate
        return grad_out * gate, None, None


class SmoothReLU(nn.Module):
    """Drop-in for nn.ReLU / nn.LeakyReLU with the smoothed backward of `_SmoothReLU`."""

    def __init__(self, alpha: float, slope: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.slope = float(alpha), float(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SmoothReLU.apply(x, self.alpha, self.slope)


class StraightThroughSmoothReLU(SmoothReLU):
    """The same function and derivatives as `SmoothReLU` in plain differentiable ops (no autograd.Function),
    which torch.func transforms and torch.compile can trace: the forward value is the exact (leaky) ReLU
    (detached), and s(x) − s(x).detach() (zero in value) carries the derivative, with
    s(x) = softplus(α·x)/α, whose derivative is sigmoid(α·x). Equal to `SmoothReLU` up to rounding
    (softplus's backward switches to exactly 1 above α·x = 20, where sigmoid is 1 − 2e-9)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.softplus(self.alpha * x) / self.alpha
        value = (F.leaky_relu(x, self.slope) if self.slope else F.relu(x)).detach()
        out = value + (1 - self.slope) * (s - s.detach())
        return out + self.slope * (x - x.detach()) if self.slope else out


@contextlib.contextmanager
def smooth_relu(model: nn.Module, alpha: float, functional: bool = False) -> Iterator[nn.Module]:
    """Within the block, every nn.ReLU / nn.LeakyReLU submodule of `model` is a `SmoothReLU`
    (`functional`: a `StraightThroughSmoothReLU`, for torch.func / torch.compile).

    The original modules are put back on exit (also on error). ReLUs called functionally
    (F.relu inside a forward) are not affected; the classifiers of `attack.models` use modules.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    kind = StraightThroughSmoothReLU if functional else SmoothReLU
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, (nn.ReLU, nn.LeakyReLU)):
                    slope = child.negative_slope if isinstance(child, nn.LeakyReLU) else 0.0
                    setattr(parent, name, kind(alpha, slope))
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


# ---- the stationarity loss ------------------------------------------------------------------------

def stationarity_parameters(classifier: nn.Module, layers: str = "all") -> dict[str, torch.Tensor]:
    """The real parameters θ entering the equation, detached, by their `named_parameters` names.

    all: every parameter; first: the first Linear or Conv layer; fc: every Linear layer. All-zero
    tensors are left out: they cannot be normalised by their norm and say nothing about the data.
    """
    if layers not in LAYERS:
        raise ConfigError(f"kkt: unknown layers {layers!r}; choose one of {LAYERS}")
    if layers == "all":
        chosen = dict(classifier.named_parameters())
    else:
        kinds = (nn.Linear,) if layers == "fc" else (nn.Linear, nn.modules.conv._ConvNd)
        mods = [(n, m) for n, m in classifier.named_modules() if isinstance(m, kinds)]
        mods = mods[:1] if layers == "first" else mods
        chosen = {f"{n}.{p}": t for n, m in mods for p, t in m.named_parameters(recurse=False)}
    out = {k: t.detach() for k, t in chosen.items() if t.detach().ne(0).any()}
    if not out:
        raise ConfigError(f"kkt: layers={layers!r} selects no non-zero parameters of {type(classifier).__name__}")
    return out


def margins(logits: torch.Tensor, labels: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """(B, N) logits, (B,) labels -> (B,) margin f_y − max_{k≠y} f_k (soft: − logsumexp_{k≠y} f_k)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - (torch.logsumexp(others, dim=1) if soft else others.amax(dim=1))


def weighted_margin_grad(classifier: nn.Module, at: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                         lam: torch.Tensor, *, soft: bool = False, create_graph: bool = True) -> dict[str, torch.Tensor]:
    """Σⱼ λⱼ ∇θ mⱼ(xⱼ) evaluated at θ = `at`: one forward and ONE backward over the weighted sum.

    at: name -> tensor for the parameters to differentiate (the rest are the module's own);
    x (B, C, H, W), labels (B,), lam (B,). Returns name -> tensor shaped like at[name];
    with create_graph the result is differentiable w.r.t. x and lam.
    """
    at = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in at.items()}
    logits = functional_call(classifier, at, (x,), strict=False)
    total = (lam * margins(logits, labels, soft)).sum()
    grads = torch.autograd.grad(total, list(at.values()), create_graph=create_graph)
    return dict(zip(at, grads))


def residual(theta: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar mean over tensors p of ‖θ_p − g_p‖² / ‖θ_p‖² (1 when g = 0)."""
    return torch.stack([(theta[k] - g[k]).pow(2).sum() / theta[k].pow(2).sum() for k in theta]).mean()


def stationarity_loss(classifier: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                      lam: torch.Tensor, *, at: dict[str, torch.Tensor] | None = None, soft: bool = False
                      ) -> torch.Tensor:
    """Scalar normalised residual of θ = (1/m) Σⱼ λⱼ ∇θ mⱼ(xⱼ).

    params: name -> target tensor θ (e.g. `stationarity_parameters`); x (m, C, H, W); labels (m,)
    int64; lam (m,). Gradients are taken at `at` (default: at `params` themselves), so a test can
    build a target from gradients at another point. Differentiable w.r.t. x and lam. The classifier
    should be in eval mode.
    """
    g = weighted_margin_grad(classifier, at if at is not None else params, x, labels, lam, soft=soft)
    return residual(params, {k: v / len(x) for k, v in g.items()})


def range_prior(x: torch.Tensor) -> torch.Tensor:
    """Scalar mean over pixels of relu(−x) + relu(x − 1): zero inside [0, 1]."""
    return (F.relu(-x) + F.relu(x - 1)).mean()


def residual_backward(classifier: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                      lam: torch.Tensor, *, soft: bool = False, batch: int | None = None) -> torch.Tensor:
    """Backpropagate `stationarity_loss` into x.grad and lam.grad; return its value (detached).

    With `batch` the candidates go through in chunks and memory holds one chunk's graph: a first
    pass sums g without graphs; then d residual / d g_p = −2 (θ_p − g_p) / (P ‖θ_p‖²) is fixed, and
    each chunk backpropagates ⟨that, g_chunk⟩ / m: exactly the full gradient, as g is a sum of chunks.
    """
    m = len(x)
    if batch is None or batch >= m:
        res = stationarity_loss(classifier, theta, x, labels, lam, soft=soft)
        res.backward()
        return res.detach()
    chunks = [slice(s, s + batch) for s in range(0, m, batch)]
    g = {k: torch.zeros_like(v) for k, v in theta.items()}
    for s in chunks:
        for k, v in weighted_margin_grad(classifier, theta, x[s].detach(), labels[s], lam[s].detach(),
                                         soft=soft, create_graph=False).items():
            g[k] += v / m
    res = residual(theta, g)
    coef = {k: -2 * (theta[k] - g[k]) / (len(theta) * theta[k].pow(2).sum() * m) for k in theta}
    for s in chunks:
        gc = weighted_margin_grad(classifier, theta, x[s], labels[s], lam[s], soft=soft)
        sum((coef[k] * gc[k]).sum() for k in theta).backward()
    return res


# ---- the same step as pure functions (torch.func), for torch.compile --------------------------------

def functional_step(classifier: nn.Module, theta: dict[str, torch.Tensor], labels: torch.Tensor, *,
                    soft: bool = False, batch: int | None = None, compile: bool = False
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """step(x, lam) -> (residual, d residual / dx, d residual / dλ): what `residual_backward` computes,
    as torch.func transforms of pure functions (the classifier's ReLUs must be
    `StraightThroughSmoothReLU`: `smooth_relu(..., functional=True)`). With `batch`, the same two
    passes over chunks as `residual_backward`. `compile`: each function through torch.compile
    (autograd's double backward through a compiled graph is not supported; torch.func's nested
    grad is).
    """
    def total(params: dict[str, torch.Tensor], x: torch.Tensor, lab: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return (lam * margins(functional_call(classifier, params, (x,), strict=False), lab, soft)).sum()

    def loss(x: torch.Tensor, lam: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = grad(total)(theta, x, lab, lam)
        res = residual(theta, {k: v / len(x) for k, v in g.items()})
        return res, res.detach()

    def pull(x: torch.Tensor, lam: torch.Tensor, lab: torch.Tensor, coef: dict[str, torch.Tensor]) -> torch.Tensor:
        g = grad(total)(theta, x, lab, lam)
        return sum((coef[k] * g[k]).sum() for k in theta)

    wrap = torch.compile if compile else (lambda f: f)
    whole, first = wrap(grad(loss, argnums=(0, 1), has_aux=True)), wrap(grad(total))
    back = wrap(grad(pull, argnums=(0, 1)))

    def step(x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, lam, m = x.detach(), lam.detach(), len(x)  # the transforms differentiate; no autograd graph
        if batch is None or batch >= m:
            (gx, gl), res = whole(x, lam, labels)
            return res, gx, gl
        chunks = [slice(s, s + batch) for s in range(0, m, batch)]
        g = {k: torch.zeros_like(v) for k, v in theta.items()}
        for s in chunks:
            for k, v in first(theta, x[s], labels[s], lam[s]).items():
                g[k] += v / m
        res = residual(theta, g)
        coef = {k: -2 * (theta[k] - g[k]) / (len(theta) * theta[k].pow(2).sum() * m) for k in theta}
        parts = [back(x[s], lam[s], labels[s], coef) for s in chunks]
        return res, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return step
