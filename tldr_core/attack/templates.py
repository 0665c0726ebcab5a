"""The weight-template attack (docs/method.md §5; after the Lab41 blog post on reading training data out of weights).

For a classifier whose first trainable layer is fully connected, each class has a direction in
pixel space that the weights point along; reshaped to the input's shape and rescaled to [0, 1] it
is a candidate reconstruction of that class. No optimisation and no data are needed. The
candidates are scored with exactly the metrics and baselines of the generator's reconstructions
(:func:`tldr_core.scoring.pipeline.template_attack`), so both attacks sit in one table.

Which direction is "class k's weight rows" (:func:`class_directions`):

- **linear** model (the first layer is also the output layer, ``MLP(hidden=0)``): row ``W[k]``.
  During training its update is ``sum_i (1[y_i = k] - p_ik) x_i``: the class's images minus
  the images it is confused with, so the row drifts towards the class mean (the blog's point).
- **linear-path** (``MLP`` with a hidden layer: ``out(act(W1 x + b1))``): ``W2[k] @ W1``, the
  rows of W1 weighted by how strongly each hidden unit feeds class k. It is the input-gradient
  of logit k with every hidden unit in its linear regime (exact for LeakyReLU's positive side),
  so it does not depend on any input image, and it sums over all hidden units instead of a
  hand-picked "top-j" whose cut-off would be arbitrary.
- **jacobian** (any other model whose first trainable layer is ``nn.Linear``): the gradient of
  logit k with respect to that layer's output, taken at a mid-grey input, times the layer's
  weight matrix. It equals the linear path for an MLP whose hidden units are all active there.

Rendering and sign (:func:`render`): a direction has no natural sign or scale. For each class
four candidate images are made: min-max rescaling of ``t`` and of ``-t`` (the rescaling the blog
uses) and the positive part ``max(t, 0) / max(t)`` of ``t`` and ``-t`` (pixels the class pushes
*down* become black, like a digit's background). The attacker keeps, per class, the candidate the
classifier itself gives the highest probability of that class. The choice uses only the model,
never the training data, so the scores stay honest; on MNIST it keeps ``+t``, mostly its positive
part (docs/defence.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


RENDERINGS = ("minmax", "positive")
SIGNS = ("+", "-")


@dataclass
class TemplateResult:
    """One candidate reconstruction per class, read off the weights."""

    images: Tensor               # (K, C, H, W) chosen renderings in [0, 1]
    labels: Tensor               # (K,) class of each template (0..K-1)
    directions: Tensor           # (K, C, H, W) signed, unscaled class directions
    choice: list[str]            # per class, e.g. "positive+" (rendering and sign the classifier preferred)
    class_prob: Tensor           # (K,) classifier probability of class k for the chosen image
    method: str                  # linear | linear-path | jacobian
    metrics: dict[str, float] = field(default_factory=dict)  # score_reconstructions' dict (after scoring)
    nearest_index: Tensor | None = None  # (K,) index into the training set of each nearest training image
    nearest_ssim: Tensor | None = None   # (K,)
    exposure: Any = None                 # per-training-image exposure (set by the scoring layer)
    gallery: Any = None                  # the most exposed training images (set by the scoring layer)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "choice": self.choice,
                "class_prob": [round(float(p), 4) for p in self.class_prob], **self.metrics}


def first_trainable_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in registration order) holding parameters of its own, or None."""
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


def applies(model: nn.Module) -> bool:
    """Whether the weight-template attack applies: the first trainable layer is fully connected."""
    return isinstance(first_trainable_layer(model), nn.Linear)


def _num_classes(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        with torch.no_grad():
            n = model(torch.zeros(1, *in_shape)).shape[1]
    return int(n)


def class_directions(model: nn.Module, in_shape: tuple[int, int, int] | None = None) -> tuple[Tensor, str]:
    """(K, C*H*W) class directions in pixel space and the method used (see the module doc)."""
    first = first_trainable_layer(model)
    if not isinstance(first, nn.Linear):
        raise ValueError(f"the weight-template attack needs a fully connected first layer; this model's first "
                         f"trainable layer is {type(first).__name__}")
    in_shape = tuple(in_shape or getattr(model, "in_shape", ()))
    if math.prod(in_shape) != first.in_features:
        raise ValueError(f"input shape {in_shape} does not match the first layer's {first.in_features} inputs")
    k = _num_classes(model, in_shape)
    w1 = first.weight.detach().float()
    out = getattr(model, "out", None)
    if first is out and first.out_features == k:
        return w1.clone(), "linear"
    fc = getattr(model, "fc", None)
    if (isinstance(out, nn.Linear) and out.out_features == k and isinstance(fc, nn.Sequential)
            and [m for m in fc.modules() if isinstance(m, nn.Linear)] == [first]
            and out.in_features == first.out_features):
        return out.weight.detach().float() @ w1, "linear-path"
    return _jacobian_directions(model, first, in_shape, k), "jacobian"


def _jacobian_directions(model: nn.Module, first: nn.Linear, in_shape: tuple[int, ...], k: int) -> Tensor:
    captured: dict[str, Tensor] = {}

    def hook(_mod, _inp, output):
        h = output.detach().requires_grad_(True)
        captured["h"] = h
        return h

    was_training = model.training
    handle = first.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(torch.full((1, *in_shape), 0.5))
            rows = [torch.autograd.grad(logits[0, c], captured["h"], retain_graph=True)[0].reshape(-1)
                    for c in range(k)]
    finally:
        handle.remove()
        model.train(was_training)
    return torch.stack(rows) @ first.weight.detach().float()


def render(t: Tensor, how: str) -> Tensor:
    """(K, D) directions -> (K, D) images in [0, 1]. minmax: (t - min) / (max - min) per row;
    positive: max(t, 0) / max(t) per row (all-zero when a row has no positive entry)."""
    if how == "minmax":
        lo, hi = t.min(dim=1, keepdim=True).values, t.max(dim=1, keepdim=True).values
        return (t - lo) / (hi - lo).clamp_min(1e-12)
    if how == "positive":
        hi = t.max(dim=1, keepdim=True).values.clamp_min(1e-12)
        return t.clamp_min(0) / hi
    raise ValueError(f"unknown rendering {how!r}; choose from {RENDERINGS}")


@torch.no_grad()
def _class_probs(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        p = torch.softmax(model(images.to(dev)).float(), dim=1).cpu()
    finally:
        model.train(was_training)
    return p[torch.arange(len(labels)), labels]


def weight_templates(model: nn.Module, in_shape: tuple[int, int, int] | None = None,
                     renderings: tuple[str, ...] = RENDERINGS, signs: tuple[str, ...] = SIGNS) -> TemplateResult:
    """Read one template per class off the weights; per class, keep the rendering/sign the classifier
    scores highest for that class (no data involved)."""
    in_shape = tuple(in_shape or model.in_shape)
    d, method = class_directions(model, in_shape)
    k = d.shape[0]
    labels = torch.arange(k)
    cands, names = [], []
    for how in renderings:
        for s in signs:
            cands.append(render(d if s == "+" else -d, how).reshape(k, *in_shape))
            names.append(f"{how}{s}")
    probs = torch.stack([_class_probs(model, c, labels) for c in cands])  # (n_cands, K)
    best = probs.argmax(dim=0)
    images = torch.stack([cands[int(best[c])][c] for c in range(k)]).float()
    return TemplateResult(images=images, labels=labels, directions=d.reshape(k, *in_shape),
                          choice=[names[int(b)] for b in best], class_prob=probs.max(dim=0).values, method=method)

