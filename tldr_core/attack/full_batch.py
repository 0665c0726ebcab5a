"""Full-batch quantities of a classifier on its training set: the gradient of its training objective,
how far it is from a stationary point, its normalised margin, and an L-BFGS polish to a stationary point.

The objective is the one `classifier.train_classifier` minimises, evaluated in eval mode (no dropout,
BatchNorm on running statistics): mean cross-entropy over T plus (wd/2)·‖θ‖² over every parameter,
which is what SGD's and Adam's (L2, not decoupled) `weight_decay=wd` add to the gradient. At a
stationary point ∇CE(θ) + wd·θ = 0, i.e. θ = −∇CE / wd: the equation the KKT attack solves
(docs/method.md §8). The relative residual ‖∇CE + wd·θ‖ / ‖wd·θ‖ says how far from it the weights are.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tldr_core.attack.train import NonFiniteLossError


def _chunks(n: int, batch: int) -> list[slice]:
    return [slice(s, s + batch) for s in range(0, n, batch)]


def ce_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 1024,
                dtype: torch.dtype | None = torch.float64) -> tuple[float, dict[str, torch.Tensor]]:
    """(mean cross-entropy over (x, y), its gradient by parameter name), in eval mode, without touching
    the model (a detached copy of its parameters is differentiated; `dtype` None keeps the model's).

    x (n, C, H, W), y (n,) int64; computed in chunks of `batch` images (memory), summed exactly.
    """
    model.eval()
    dev = next(model.parameters()).device
    params = {k: v.detach().to(dtype or v.dtype).requires_grad_(True) for k, v in model.named_parameters()}
    buffers = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in model.named_buffers()}
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    total = 0.0
    for s in _chunks(len(x), batch):
        xs = x[s].to(dev, dtype or next(iter(params.values())).dtype)
        logits = functional_call(model, {**params, **buffers}, (xs,), strict=False)
        loss = F.cross_entropy(logits, y[s].to(dev), reduction="sum") / len(x)
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            grads[k] += g
        total += loss.item()
    return total, grads


def wd_residual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, *,
                batch: int = 1024, dtype: torch.dtype | None = torch.float64) -> float:
    """‖∇CE(θ) + wd·θ‖ / ‖wd·θ‖ over all parameters (0 at a stationary point, ~1 far from one)."""
    if not weight_decay > 0:
        raise ValueError(f"the stationarity residual needs weight decay > 0, got {weight_decay!r}")
    _, grads = ce_gradient(model, x, y, batch=batch, dtype=dtype)
    num = den = 0.0
    for k, p in model.named_parameters():
        wt = weight_decay * p.detach().to(grads[k].dtype)
        num += (grads[k] + wt).pow(2).sum().item()
        den += wt.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else float("inf")


def homogeneity_degree(model: nn.Module) -> int:
    """Layers with a weight (Linear, Conv, BatchNorm's affine): the degree L in f(cθ) ≈ c^L f(θ) of a
    bias-free ReLU network, used to normalise its margin."""
    return sum(1 for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter))


@torch.no_grad()
def normalised_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 1024
                      ) -> tuple[float, float]:
    """(min over T of the hard margin f_y − max_{k≠y} f_k, that minimum / ‖θ‖^L).

    For a positively homogeneous network trained without weight decay the normalised margin grows
    towards a KKT point of the max-margin problem (Lyu & Li 2020); with biases the network is only
    approximately homogeneous and the quotient is an approximation of that quantity.
    """
    model.eval()
    dev = next(model.parameters()).device
    lowest = math.inf
    for s in _chunks(len(x), batch):
        logits = model(x[s].to(dev))
        labels = y[s].to(dev)
        own = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        lowest = min(lowest, (own - others).min().item())
    norm = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))
    return lowest, lowest / max(norm, 1e-300) ** homogeneity_degree(model)


def _closure(work: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, wd: float,
             batch: int) -> Callable[[], torch.Tensor]:
    """L-BFGS closure: mean CE + (wd/2)‖θ‖², gradients accumulated over chunks of T."""
    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        total = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        for s in _chunks(len(x), batch):
            loss = F.cross_entropy(work(x[s]), y[s], reduction="sum") / len(x)
            loss.backward()
            total += loss.detach()
        reg = 0.5 * wd * sum(p.pow(2).sum() for p in params)
        reg.backward()
        total += reg.detach()
        if not torch.isfinite(total):
            raise NonFiniteLossError(f"L-BFGS polish: the objective became {total.item()}")
        return total
    return closure


def lbfgs_polish(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float, *, steps: int,
                 target: float = 1e-3, double: bool = True, batch: int = 1024, round_steps: int = 25,
                 log: Callable[[str], None] = print) -> dict[str, float]:
    """Full-batch L-BFGS (strong Wolfe line search) on mean CE + (wd/2)‖θ‖², in place on `model`, until
    the residual `wd_residual` of the model as stored (its own dtype) is <= `target` or `steps`
    iterations are spent, checked every `round_steps` iterations. The residual is not monotone along
    L-BFGS's path, so the model keeps the best checked point. `double`: iterate in float64.
    Returns {"polish_steps", "polish_seconds", "polish_residual"}.
    """
    if not weight_decay > 0:
        raise ValueError("L-BFGS polish needs weight decay > 0: without it there is no stationary point")
    t0, done = time.time(), 0
    dev, dtype = next(model.parameters()).device, torch.float64 if double else next(model.parameters()).dtype
    work = copy.deepcopy(model).to(dtype).eval().requires_grad_(True)
    params = list(work.parameters())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=round_steps, history_size=50, tolerance_grad=0.0,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")
    closure = _closure(work, params, x.to(dev, dtype), y.to(dev), weight_decay, batch)
    best = wd_residual(model, x, y, weight_decay, batch=batch)
    kept = [p.detach().clone() for p in model.parameters()]
    every = max(round_steps, steps // 20)
    while done < steps and best > target:
        opt.param_groups[0]["max_iter"] = min(round_steps, steps - done)
        before = opt.state[params[0]].get("n_iter", 0)
        opt.step(closure)
        moved = opt.state[params[0]].get("n_iter", 0) - before
        done += max(moved, 1)
        with torch.no_grad():
            for p, q in zip(model.parameters(), params):
                p.copy_(q.to(p.dtype))
        res = wd_residual(model, x, y, weight_decay, batch=batch)
        if res < best:
            best, kept = res, [p.detach().clone() for p in model.parameters()]
        if done % every < round_steps or best <= target or moved == 0 or done >= steps:
            log(f"  L-BFGS polish {done}/{steps} iterations: stationarity residual {res:.3g} (best {best:.3g}, "
                f"{time.time() - t0:.0f}s)")
        if moved == 0:  # no step was possible: the line search cannot improve in this precision
            break
    with torch.no_grad():
        for p, q in zip(model.parameters(), kept):
            p.copy_(q)
    return {"polish_steps": done, "polish_seconds": round(time.time() - t0, 2), "polish_residual": best}
