"""How well the audited classifier satisfies the KKT attack's premise on its own training set T.

The KKT attack (docs/method.md §8) assumes θ is a weighted sum of margin gradients at the training
images. Whether that holds is measurable by whoever has T (the auditor):

- trained with weight decay wd > 0 (form "weight_decay"): the relative residual
  r = ‖∇L(θ) + wd·θ‖ / ‖wd·θ‖ with L the mean cross-entropy over T in eval mode (the objective the
  classifier was trained on, `attack.full_batch`); r = 0 exactly at a stationary point, where
  θ = −∇L / wd = (1/(wd·n)) Σᵢ (1 − p_y(xᵢ)) ∇θ m̃ᵢ.
- trained without weight decay (form "margin"): the best non-negative combination of hard-margin
  gradients, λ = argmin_{λ ≥ 0} ‖θ − Σᵢ λᵢ ∇θ mᵢ‖ (exact ReLU gradients, no smoothing), found by
  non-negative least squares on the Gram matrix of per-example gradients (computed in chunks of
  bounded memory); r = ‖θ − Σᵢ λᵢ ∇θ mᵢ‖ / ‖θ‖ and the cosine between θ and that sum.

Both give r per parameter tensor, per layer (a module's tensors together) and overall, and the
fraction of ‖θ‖² explained, 1 − r². "The premise holds to X %" means X = 100 · max(0, 1 − r).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tldr_core.attack.full_batch import ce_gradient
from tldr_core.attack.kkt import margins

FORMS = ("auto", "weight_decay", "margin")
#: The margin form refuses n·P above this (per-example gradients: n backward passes per chunk pair).
MAX_NP = 2_000_000_000
#: ... and more than this many training images (the n × n Gram matrix in float64).
MAX_N = 20_000


class StationarityError(ValueError):
    """The diagnostic cannot be computed (weight decay unknown, problem too large); the message says why."""


@dataclass(frozen=True)
class Stationarity:
    """The diagnostic's result: r overall, by layer and by tensor (see the module docstring)."""

    form: str                        # "weight_decay" or "margin"
    weight_decay: float
    residual: float
    per_layer: dict[str, float]
    per_tensor: dict[str, float]
    cosine: float                    # cos(θ, the gradient combination that should equal it)
    train_size: int
    lambdas: tuple[float, ...] = field(default=(), repr=False)  # margin form: the fitted λ ≥ 0

    @property
    def explained(self) -> float:
        """Fraction of ‖θ‖² the combination explains: 1 − r²."""
        return 1.0 - self.residual ** 2

    @property
    def holds_percent(self) -> float:
        return 100.0 * max(0.0, 1.0 - self.residual)

    def metrics(self) -> dict[str, float]:
        """Flat floats: stationarity_residual, stationarity_residual_<layer> (dots as underscores), ..."""
        out = {"stationarity_residual": self.residual, "stationarity_explained": self.explained,
               "stationarity_cosine": self.cosine, "stationarity_weight_decay": self.weight_decay}
        out.update({f"stationarity_residual_{_flat(k)}": v for k, v in self.per_layer.items()})
        if self.form == "margin":
            lam = torch.tensor(self.lambdas or (0.0,), dtype=torch.float64)
            out.update(stationarity_lambda_support=float((lam > 0).sum()), stationarity_lambda_max=float(lam.max()))
        return out

    def sentence(self) -> str:
        worst = max(self.per_layer, key=self.per_layer.get)
        what = ("‖∇L + wd·θ‖/‖wd·θ‖" if self.form == "weight_decay"
                else "‖θ − Σ λᵢ∇θmᵢ‖/‖θ‖ with the best λ ≥ 0 (no weight decay)")
        return (f"The KKT attack's premise holds to {self.holds_percent:.2f} % on T: {what} = {self.residual:.3g} "
                f"(worst layer {worst}: {self.per_layer[worst]:.3g}).")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _ratios(diff: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]
            ) -> tuple[float, dict[str, float], dict[str, float]]:
    """‖diff‖/‖ref‖ overall, per layer, per tensor (tensors with ‖ref‖ = 0 count only overall)."""
    sq = {k: (diff[k].pow(2).sum().item(), ref[k].pow(2).sum().item()) for k in ref}
    layers: dict[str, list[float]] = {}
    for k, (d, r) in sq.items():
        acc = layers.setdefault(_layer(k), [0.0, 0.0])
        acc[0], acc[1] = acc[0] + d, acc[1] + r
    ratio = lambda d, r: math.sqrt(d / r) if r > 0 else float("inf")  # noqa: E731
    total = ratio(sum(d for d, _ in sq.values()), sum(r for _, r in sq.values()))
    return (total, {k: ratio(d, r) for k, (d, r) in layers.items() if r > 0},
            {k: ratio(d, r) for k, (d, r) in sq.items() if r > 0})


def _cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    dot = sum((a[k] * b[k]).sum().item() for k in a)
    na = math.sqrt(sum(a[k].pow(2).sum().item() for k in a))
    nb = math.sqrt(sum(b[k].pow(2).sum().item() for k in a))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def weight_decay_of(meta: Mapping[str, Any] | None) -> float | None:
    """The weight decay a checkpoint's meta records (`meta["settings"]["weight_decay"]`), else None."""
    settings = (meta or {}).get("settings")
    wd = settings.get("weight_decay") if isinstance(settings, Mapping) else None
    return float(wd) if isinstance(wd, (int, float)) and not isinstance(wd, bool) else None


def stationarity(classifier: nn.Module, train: Any, meta: Mapping[str, Any] | None = None, *,
                 weight_decay: float | None = None, form: str = "auto", batch: int = 1024,
                 memory_bytes: int = 1 << 30, max_np: int = MAX_NP) -> Stationarity:
    """The diagnostic for `classifier` on `train` (a Split: images (n, C, H, W), labels (n,)).

    weight_decay: the training's (default: from `meta`, as `classifier.load_or_train` records it);
    form auto: "weight_decay" when it is > 0, else "margin". Computed in float64 on the classifier's
    device; the classifier is not modified. StationarityError when the weight decay is unknown or the
    margin form's problem exceeds `max_np` (n·P) or MAX_N images.
    """
    if form not in FORMS:
        raise StationarityError(f"unknown form {form!r}; choose one of {FORMS}")
    wd = weight_decay if weight_decay is not None else weight_decay_of(meta)
    if wd is None and form != "margin":
        raise StationarityError("the classifier's weight decay is unknown (its meta records no settings); "
                                "pass it (0 for training without weight decay)")
    wd = float(wd or 0.0)
    if form == "auto":
        form = "weight_decay" if wd > 0 else "margin"
    if form == "weight_decay" and not wd > 0:
        raise StationarityError(f"form weight_decay needs weight decay > 0, got {wd}")
    x, y = train.images, train.labels
    if form == "weight_decay":
        return _weight_decay_form(classifier, x, y, wd, batch)
    return _margin_form(classifier, x, y, wd, batch, memory_bytes, max_np)


def _weight_decay_form(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float, batch: int
                       ) -> Stationarity:
    _, grads = ce_gradient(classifier, x, y, batch=batch)
    wt = {k: wd * p.detach().to(grads[k].dtype) for k, p in classifier.named_parameters()}
    total, layers, tensors = _ratios({k: grads[k] + wt[k] for k in wt}, wt)
    return Stationarity("weight_decay", wd, total, layers, tensors, _cosine(wt, {k: -g for k, g in grads.items()}),
                        len(x))


# ---- the margin form: non-negative least squares on per-example margin gradients ---------------------

def _example_grads(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                   ) -> torch.Tensor:
    """(len(x), P): row i = ∇θ m(xᵢ) flattened in `params` order, exact gradients (torch.func: vmap of
    grad over the images, the model in eval mode)."""
    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return margins(functional_call(model, p, (xi[None],), strict=False), yi[None]).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], 1)


def margin_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, memory_bytes: int = 1 << 30,
                max_np: int = MAX_NP) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, b): G = J Jᵀ (n, n) and b = J θ (n,), J the per-example margin gradients, float64.

    Two chunks of rows of J are held at a time (each at most memory_bytes / 2); off-diagonal blocks
    recompute the second chunk, so the cost is about (k + 1)/2 · n backward passes for k chunks.
    """
    dev = next(model.parameters()).device
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    n, p = len(x), sum(v.numel() for v in params.values())
    if n > MAX_N or n * p > max_np:
        raise StationarityError(f"the margin form needs per-example gradients of {n} images x {p:,} parameters "
                                f"(n·P = {n * p:,}); refused above n·P = {max_np:,} or n = {MAX_N:,}")
    work = _double(model)
    xd, yd = x.to(dev, torch.float64), y.to(dev)
    theta = torch.cat([v.detach().reshape(-1) for v in params.values()])
    rows = max(1, min(n, memory_bytes // (2 * 8 * p)))
    chunks = [slice(s, s + rows) for s in range(0, n, rows)]
    gram, b = torch.zeros(n, n, dtype=torch.float64, device=dev), torch.zeros(n, dtype=torch.float64, device=dev)
    for i, a in enumerate(chunks):
        ja = _example_grads(work, params, xd[a], yd[a])
        b[a] = ja @ theta
        gram[a, a] = ja @ ja.T
        for c in chunks[i + 1:]:
            block = ja @ _example_grads(work, params, xd[c], yd[c]).T
            gram[a, c], gram[c, a] = block, block.T
    return gram, b


def _double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval().requires_grad_(False)


def nnls_gram(gram: torch.Tensor, b: torch.Tensor, *, tol: float = 1e-10, max_iter: int | None = None
              ) -> torch.Tensor:
    """argmin_{λ ≥ 0} λᵀGλ − 2bᵀλ (= ‖θ − Jᵀλ‖² − ‖θ‖²): Lawson–Hanson's active-set method on the Gram
    form (exact up to `tol`, relative to G's largest diagonal entry; at most `max_iter` solves)."""
    n = len(b)
    scale = max(float(gram.diagonal().max()), 1e-300)
    lam = torch.zeros(n, dtype=gram.dtype, device=gram.device)
    active = torch.zeros(n, dtype=torch.bool, device=gram.device)
    budget = max_iter or 3 * n + 10
    while budget > 0:
        w = b - gram @ lam  # minus half the gradient: positive where raising λ lowers the residual
        if active.all() or float(w[~active].max()) <= tol * scale:
            break
        active[torch.where(active, torch.full_like(w, -math.inf), w).argmax()] = True
        while budget > 0:
            budget -= 1
            idx = active.nonzero().squeeze(1)
            s = torch.zeros_like(lam)
            s[idx] = torch.linalg.lstsq(gram[idx][:, idx], b[idx].unsqueeze(1)).solution.squeeze(1)
            if bool((s[idx] > 0).all()):
                lam = s
                break
            neg = idx[s[idx] <= 0]  # step towards s until the first coefficient reaches 0, drop it
            step = (lam[neg] / (lam[neg] - s[neg]).clamp_min(1e-300)).min()
            lam = lam + step * (s - lam)
            active &= lam > tol * max(float(lam.abs().max()), 1e-300)
            lam[~active] = 0.0
            if not active.any():
                break
    return lam


def _margin_form(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float, batch: int,
                 memory_bytes: int, max_np: int) -> Stationarity:
    gram, b = margin_gram(classifier, x, y, memory_bytes=memory_bytes, max_np=max_np)
    lam = nnls_gram(gram, b)
    work = _double(classifier)
    dev = next(work.parameters()).device
    params = {k: v.detach().requires_grad_(True) for k, v in work.named_parameters()}
    fit = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, len(x), batch):  # Σ λᵢ ∇θ mᵢ: one backward of the weighted sum per chunk
        logits = functional_call(work, params, (x[s:s + batch].to(dev, torch.float64),), strict=False)
        total = (lam[s:s + batch] * margins(logits, y[s:s + batch].to(dev))).sum()
        for k, g in zip(params, torch.autograd.grad(total, list(params.values()))):
            fit[k] += g
    theta = {k: v.detach() for k, v in params.items()}
    total_r, layers, tensors = _ratios({k: theta[k] - fit[k] for k in theta}, theta)
    return Stationarity("margin", wd, total_r, layers, tensors, _cosine(theta, fit), len(x),
                        tuple(float(v) for v in lam.cpu()))
