"""The nine TLDR loss terms (docs/method.md §3-4), one small pure function each.

Names match `LossWeights` fields. `compute_terms` returns a dict of unweighted terms; the
weighted sum is one line in `weighted_total`. Shapes: B batch, N classes, F features,
C/H/W image channels and size.

Image priors, off by default (their settings are `AttackConfig.bn`, `.jitter`, `.flip`): the
BatchNorm-statistics term "bn" (DeepInversion, Yin et al. 2020) and random jitter/flips of the
classifier's input (`augment`); the generated images themselves are never altered.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights
from tldr_core.attack.models import HeadOnly

_EPS = 1e-12


def kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q), P (B, N) conditioning distribution, Q = softmax(logits (B, N)); mean over batch.

    xlogy makes 0 * log 0 = 0, so hot (one-hot) vectors are fine.
    """
    return (torch.xlogy(p, p) - p * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, N) to the encoded labels (B,); mean over batch."""
    return F.cross_entropy(logits, labels)


def cos(features: torch.Tensor) -> torch.Tensor:
    """1/(B(B-1)) * sum_{i != j} cos(f_i, f_j) for features (B, F)."""
    b = features.shape[0]
    f = F.normalize(features, dim=1, eps=_EPS)
    sim = f @ f.T
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def ortho(features: torch.Tensor) -> torch.Tensor:
    """1/B^2 * sum_{i,j} (G_ij - delta_ij)^2 with G the Gram matrix of L2-normalised features (B, F)."""
    f = F.normalize(features, dim=1, eps=_EPS)
    gram = f @ f.T
    return ((gram - torch.eye(f.shape[0], device=f.device, dtype=f.dtype)) ** 2).mean()


def var(images: torch.Tensor) -> torch.Tensor:
    """Total variation 1/B * sum_i sum_{h,w} (dI/dh)^2 + (dI/dw)^2 of images (B, C, H, W)."""
    dh = images[:, :, 1:, :] - images[:, :, :-1, :]
    dw = images[:, :, :, 1:] - images[:, :, :, :-1]
    return ((dh ** 2).sum() + (dw ** 2).sum()) / images.shape[0]


def pix(images: torch.Tensor) -> torch.Tensor:
    """sum max(0, -I) + sum max(0, I - 1) per image (B, C, H, W), averaged over the batch."""
    return (F.relu(-images).sum() + F.relu(images - 1).sum()) / images.shape[0]


# ---- image priors: BatchNorm statistics, jitter and flips ------------------------------------------

def bn_stats(features_inputs: list[torch.Tensor], running_means: list[torch.Tensor],
             running_vars: list[torch.Tensor]) -> torch.Tensor:
    """Σ over BatchNorm layers of ‖μ_batch − μ_run‖₂ + ‖σ²_batch − σ²_run‖₂ (DeepInversion).

    features_inputs[l]: layer l's input (B, C) or (B, C, H, W); running_means/vars[l]: (C,).
    Batch statistics per channel over the batch (and positions), variance biased as BatchNorm
    normalises with it. Zero exactly when the batch has the training set's running statistics.
    """
    total = features_inputs[0].new_zeros(())
    for a, mu, var in zip(features_inputs, running_means, running_vars, strict=True):
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)  # (C, B·H·W)
        total = total + torch.linalg.vector_norm(flat.mean(1) - mu) + \
            torch.linalg.vector_norm(flat.var(1, unbiased=False) - var)
    return total


@contextlib.contextmanager
def record_bn_inputs(classifier: nn.Module) -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Within the block, every forward of a BatchNorm layer appends (layer, its input) to the list."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0])))
             for m in classifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def bn_term(seen: list[tuple[nn.Module, torch.Tensor]]) -> torch.Tensor:
    """`bn_stats` of the layer inputs recorded by `record_bn_inputs` (needs running statistics)."""
    if not seen:
        raise ConfigError("the bn prior needs a classifier with BatchNorm layers; set bn: 0 for this model")
    mods = [m for m, _ in seen]
    if any(m.running_mean is None for m in mods):
        raise ConfigError("the bn prior needs BatchNorm layers that track running statistics (bn: 0 otherwise)")
    return bn_stats([a for _, a in seen], [m.running_mean for m in mods], [m.running_var for m in mods])


def augment(images: torch.Tensor, jitter: int = 0, flip: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) -> the same images rolled by (dy, dx) ∈ [−jitter, jitter]² and, with probability
    1/2, flipped left-right; one draw for the whole batch (as DeepInversion). A new tensor: the
    input is never modified. The draws use `generator` (CPU), so no device sync is needed."""
    if jitter:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=generator).item() < 0.5:
        images = torch.flip(images, dims=(3,))
    return images


# ---- Grad: the norm of the classifier's weight gradient on the generated images -----------------

def grad_parameters(classifier: nn.Module, scope: str = "head") -> dict[str, torch.Tensor]:
    """The weights θ whose gradient norm is taken, detached from the frozen classifier.

    scope "all": every parameter. "head": the fully connected layers after the convolutions (the
    ones that hold class-specific information); the per-sample cost then no longer grows with the
    convolution weights, while the images still receive gradients through the whole network.
    """
    named = dict(classifier.named_parameters())
    if scope == "head":
        named = {k: p for k, p in named.items() if k.startswith(("fc.", "out."))}
    elif scope != "all":
        raise ValueError(f"grad scope must be 'head' or 'all', got {scope!r}")
    return {k: p.detach() for k, p in named.items()}


def _loss(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Parameters not in `params` and the buffers are taken from the module itself.
    return F.cross_entropy(functional_call(module, params, (x,), strict=False), y)


def _scoped(classifier: nn.Module, images: torch.Tensor, scope: str,
            trunk: torch.Tensor | None = None) -> tuple[nn.Module, torch.Tensor]:
    """(module, inputs) such that module(inputs) = classifier(images) and θ lies inside module.

    For the "head" scope the convolutional trunk runs once, batched, outside the per-sample
    transform: ∇θ of the fully connected layers depends on the images only through the trunk's
    output, and images still get their gradient through it by ordinary autograd. ``trunk``, if
    given, is ``classifier.trunk(images)`` already computed (a training step shares it with the
    other terms instead of running the trunk twice).
    """
    if scope == "head":
        return HeadOnly(classifier), classifier.trunk(images) if trunk is None else trunk
    return classifier, images


def grad_norm_per_sample(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         scope: str = "head", trunk: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) ||∇_θ CE(f_θ(I_i), y_i)||_2 for each sample, vectorised with torch.func (vmap over grad).

    Differentiable w.r.t. `images` (double backward through the classifier). Classifier in eval mode.
    """
    params = grad_parameters(classifier, scope)
    module, inputs = _scoped(classifier, images, scope, trunk)
    one = lambda p, x, y: _loss(module, p, x.unsqueeze(0), y.unsqueeze(0))
    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, labels)
    sq = sum(g.flatten(1).pow(2).sum(dim=1) for g in per_sample.values())
    return torch.sqrt(sq + _EPS)


def grad_norm_loop(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   scope: str = "head", trunk: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the same values as `grad_norm_per_sample`, by a Python loop: the reference implementation."""
    params = {k: p.requires_grad_(True) for k, p in grad_parameters(classifier, scope).items()}
    module, inputs = _scoped(classifier, images, scope, trunk)
    norms = []
    for x, y in zip(inputs, labels):
        gs = torch.autograd.grad(_loss(module, params, x[None], y[None]), list(params.values()), create_graph=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in gs) + _EPS))
    return torch.stack(norms)


def grad_norm_batch(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    scope: str = "head", trunk: torch.Tensor | None = None) -> torch.Tensor:
    """(1,) the norm of the gradient of the *batch mean* loss: one backward, much cheaper, coarser."""
    params = {k: p.requires_grad_(True) for k, p in grad_parameters(classifier, scope).items()}
    module, inputs = _scoped(classifier, images, scope, trunk)
    gs = torch.autograd.grad(_loss(module, params, inputs, labels), list(params.values()), create_graph=True)
    return torch.sqrt(sum(g.pow(2).sum() for g in gs) + _EPS).reshape(1)


def _layer_sq_norms(layer: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(B,) ||∇_θ L_i||² of one layer's own parameters, from its input ``a`` and output gradient ``d``.

    Linear  y = W a + b: ∇W_i = δ_i a_iᵀ (an outer product), so the norm needs no per-sample
            gradient: ||δ_i||² (||a_i||² + 1) (Goodfellow 2015's "ghost" identity).
    Conv2d: ∇W_i = δ_i · unfold(a_i)ᵀ, one batched matrix product (B, out, in·k·k): small for
            convolutions, whose weights are few; ∇b_i = δ_i summed over positions.
    BatchNorm (eval mode, running statistics): ∇γ_i = Σ_positions δ_i x̂_i, ∇β_i = Σ_positions δ_i.
    """
    has_bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Linear):
        return d.pow(2).sum(1) * (a.pow(2).sum(1) + (1.0 if has_bias else 0.0))
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple):
            raise ValueError("ghost Grad supports ungrouped Conv2d with numeric padding; use grad_mode per-sample")
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        d = d.flatten(2)  # (B, out, L)
        sq = torch.bmm(d, cols.transpose(1, 2)).pow(2).sum((1, 2))
        return sq + (d.sum(2).pow(2).sum(1) if has_bias else 0.0)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.training or layer.running_mean is None:
            raise ValueError("ghost Grad needs BatchNorm in eval mode (samples must not interact)")
        shape = (1, -1) + (1,) * (a.dim() - 2)
        xhat = (a - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps)
        dims = tuple(range(2, a.dim()))
        g = (d * xhat).sum(dims) if dims else d * xhat
        beta = d.sum(dims) if dims else d
        return (g.pow(2).sum(1) if layer.weight is not None else 0.0) + (beta.pow(2).sum(1) if has_bias else 0.0)
    raise ValueError(f"ghost Grad does not support {type(layer).__name__} parameters; use grad_mode per-sample")


def grad_norm_ghost(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    scope: str = "head", trunk: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the per-sample norms of `grad_norm_per_sample`, exact, vectorised layer by layer.

    One batched forward records each parametrised layer's input and output; one batched (double)
    backward of the *summed* loss gives every sample's own output gradient δ_i (samples do not
    interact: dropout and batch norm in eval mode); each layer's per-sample norm follows from
    (a_i, δ_i) in closed form (`_layer_sq_norms`). Fully connected weights, the big ones, are never
    materialised per sample. Differentiable w.r.t. `images`. Scope "head" runs the trunk outside.
    """
    names = set(grad_parameters(classifier, scope))
    module, x = _scoped(classifier, images, scope, trunk)
    if not x.requires_grad:  # constant images (scoring, tests): the δ's still need a graph
        x = x.detach().requires_grad_(True)
    layers = {n: m for n, m in classifier.named_modules()
              if any(f"{n}.{p}" in names for p, _ in m.named_parameters(recurse=False))}
    record: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: record.__setitem__(m, (inp[0], out)))
             for m in layers.values()]
    try:
        logits = module(x)
    finally:
        for h in hooks:
            h.remove()
    mods = list(record)
    # Summed (not averaged) loss: ∂L/∂y_i is then exactly sample i's own δ_i.
    deltas = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"),
                                 [record[m][1] for m in mods], create_graph=True)
    sq = sum(_layer_sq_norms(m, record[m][0], d) for m, d in zip(mods, deltas))
    return torch.sqrt(sq + _EPS)


GRAD_FUNCS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "per-sample": grad_norm_per_sample, "ghost": grad_norm_ghost, "loop": grad_norm_loop, "batch": grad_norm_batch}


def grad_term(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str = "per-sample",
              scope: str = "head", trunk: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar Grad term: mean over the batch of the weight-gradient norm (`mode` picks the method).
    ``trunk``: ``classifier.trunk(images)`` if already computed (used by the "head" scope)."""
    return GRAD_FUNCS[mode](classifier, images, labels, scope, trunk=trunk).mean()


# ---- perturbation and the whole objective ---------------------------------------------------------

def perturb(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float, kind: str = "fgsm",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """I + e with ||e||_inf <= epsilon. e is a constant (detached): gradients flow to I only.

    fgsm: e = epsilon * sign(∇_I CE), the worst case of one step: training data should stay
    confidently classified even then. random: e = epsilon * uniform sign noise.
    """
    if kind == "fgsm":
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(F.cross_entropy(classifier(x), labels), x)
        e = epsilon * g.sign()
    else:
        # drawn on the images' device (generator must live there too): no per-step host->device copy
        e = epsilon * (torch.randint(0, 2, images.shape, generator=generator, device=images.device).to(images) * 2 - 1)
    return images + e


def compute_terms(classifier: nn.Module, images: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                  cfg: AttackConfig, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """All loss terms with a non-zero weight, unweighted, keyed by `LossWeights` names (+ "bn").

    images (B, C, H, W) from the generator, v (B, N) conditioning vectors, labels (B,) encoded labels.
    Terms whose weight is 0 are skipped (the perturbed pass and Grad are the expensive ones).
    With cfg.jitter / cfg.flip the classifier sees `augment(images)` (draws from `generator`);
    Var and Pix always see the generated images. With cfg.bn the BatchNorm inputs of the main
    forward pass give the "bn" term.
    """
    w = cfg.effective_weights
    x = augment(images, cfg.jitter, cfg.flip, generator) if cfg.jitter or cfg.flip else images
    with record_bn_inputs(classifier) if cfg.bn else contextlib.nullcontext() as seen:
        trunk = classifier.trunk(x)  # computed once: Grad (head scope) starts from it too
        feats = classifier.fc(trunk)  # == classifier.features(x)
    logits = classifier.head(feats)
    terms = {"kl": kl(v, logits), "ce": ce(logits, labels), "cos": cos(feats), "ortho": ortho(feats)}
    if w.kl_pert or w.ce_pert:
        logits_p = classifier(perturb(classifier, x, labels, cfg.epsilon, cfg.perturbation))
        terms["kl_pert"], terms["ce_pert"] = kl(v, logits_p), ce(logits_p, labels)
    if w.var:
        terms["var"] = var(images)
    if w.pix:
        terms["pix"] = pix(images)
    if w.grad:
        terms["grad"] = grad_term(classifier, x, labels, cfg.grad_mode, cfg.grad_scope, trunk=trunk)
    terms = {k: t for k, t in terms.items() if getattr(w, k) or k in ("kl", "ce")}
    if cfg.bn:
        terms["bn"] = bn_term(seen)
    return terms


def weighted_total(terms: dict[str, torch.Tensor], weights: LossWeights | Mapping[str, float]) -> torch.Tensor:
    """The weighted sum of the terms (docs/method.md's L_inv / L_rec). `weights`: the nine, or a mapping
    that also names the priors (`AttackConfig.term_weights()`)."""
    w = weights.as_dict() if isinstance(weights, LossWeights) else weights
    return sum(w[k] * t for k, t in terms.items())
