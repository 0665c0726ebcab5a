"""Stationarity (KKT) reconstruction: recover training images from the weights of a converged classifier.

A network trained to (near) a stationary point has weights that are a weighted sum of gradients at
its training images, θ ≈ Σᵢ λᵢ ∇θ mᵢ(xᵢ) (Haim et al. 2022, binary; Buzaglo et al. 2023, multiclass,
weight decay). The attack optimises m free candidate images xⱼ (class-balanced labels yⱼ) and
coefficients λⱼ so that this sum matches the real weights:

    loss = residual + prior · pixel_range(x)
    residual = mean over parameter tensors p of ‖θ_p − g_p‖² / ‖θ_p‖²,   g = (1/m) Σⱼ λⱼ ∇θ mⱼ(xⱼ)

Each tensor is normalised by its own norm (our choice; Buzaglo et al.'s code sums raw squared
differences), so every layer counts alike whatever its size or scale, and residual = 1 means
"nothing explained". The 1/m (as in their code) keeps λ's scale independent of m.

Margins. `weight_decay_form=False`: the hard margin mⱼ = f_y(xⱼ) − max_{k≠y} f_k(xⱼ) of the max-margin
KKT conditions (the limit of long training without regularisation). `weight_decay_form=True`: the soft
margin mⱼ = f_y − logsumexp_{k≠y} f_k. For mean cross-entropy over n images plus (wd/2)‖θ‖² the
stationary point is, exactly, θ = (1/(wd·n)) Σᵢ (1 − p_y(xᵢ)) ∇θ m̃ᵢ, because
−∇CE = (1 − p_y) ∇(f_y − logsumexp_{k≠y} f_k): the soft margin holds at every stationary point of
weight-decayed training, not only asymptotically, with positive coefficients.

Coefficients. `lambda_sign="positive"`: λⱼ ≥ λ_min, projected after every step (the cross-entropy
coefficients (1 − p_y)/wd are positive; λ_min keeps every candidate contributing, so none is left
to drift). `lambda_sign="free"`: λ free in sign and unconstrained (λ_min unused), the general-loss
form of Buzaglo et al. 2023 for losses whose derivative changes sign (e.g. squared error).

Smoothed ReLU. ∇θ m depends on the candidate through ReLU gates whose derivative is a step, so the
candidate would get almost no gradient through them; during extraction only, ReLU's (LeakyReLU's)
backward uses sigmoid(α·x) (slope + (1 − slope)·sigmoid(α·x)) while its forward value is unchanged.

BatchNorm and dropout: the classifier runs in eval mode, so BatchNorm is a fixed affine map with its
running statistics (its weight and bias are ordinary parameters of the stationarity equation with
layers="all") and dropout is off. A network trained with dropout or BatchNorm is stationary for its
training-mode objective, so the equation holds only approximately there.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tldr_core.attack.config import ConfigError
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.train import NonFiniteLossError, resolve_device

KKT_FORMAT = "tldr-kkt-candidates/1"
LAYERS = ("all", "first", "fc")
LAMBDA_SIGNS = ("positive", "free")
_INT_FIELDS = ("per_class", "steps", "batch", "seed", "log_every")
_UNTUNED = ("batch", "seed", "device", "log_every")  # change speed or bookkeeping, not the result


@dataclass(frozen=True)
class KKTConfig:
    """Settings of one stationarity reconstruction (see the module docstring for the loss)."""

    per_class: int | None = None   # candidates per class; None: 2 x the training images per class
    steps: int = 3000
    lr: float = 1e-2               # Adam, on candidates and coefficients
    init_scale: float = 0.1        # candidates start at init_scale * N(0, 1)
    lambda_init: float = 1.0
    lambda_min: float = 0.05       # lower bound of λ (lambda_sign="positive")
    alpha: float = 100.0           # sharpness of the sigmoid replacing ReLU's derivative
    layers: str = "all"            # parameters in the equation: all, first (first Linear/Conv), fc (all Linear)
    prior: float = 1.0             # weight of the pixel-range prior
    weight_decay_form: bool = True  # soft margin (exact for cross-entropy + weight decay); False: hard margin
    lambda_sign: str = "positive"  # positive: λ >= lambda_min; free: any sign (general losses)
    batch: int | None = None       # candidates per gradient chunk (memory bound); None: all at once
    seed: int = 0
    device: str = "cpu"
    log_every: int = 100

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"kkt: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("per_class", "batch"):
            v = getattr(self, name)
            check(v is None or (is_int(v) and v > 0), f"{name} must be a positive integer or None, got {v!r}")
        for name in ("steps", "log_every"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        for name in ("lr", "init_scale", "lambda_init", "lambda_min", "alpha", "prior"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.init_scale > 0, f"init_scale must be > 0, got {self.init_scale}")
        check(self.lambda_min >= 0, f"lambda_min must be >= 0, got {self.lambda_min}")
        check(self.lambda_init > 0, f"lambda_init must be > 0, got {self.lambda_init}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(self.prior >= 0, f"prior must be >= 0, got {self.prior}")
        check(self.layers in LAYERS, f"unknown layers {self.layers!r}; choose one of {LAYERS}")
        check(self.lambda_sign in LAMBDA_SIGNS, f"unknown lambda_sign {self.lambda_sign!r}; choose one of {LAMBDA_SIGNS}")
        check(isinstance(self.weight_decay_form, bool), f"weight_decay_form must be true or false, got {self.weight_decay_form!r}")
        check(self.lambda_sign == "free" or self.lambda_init >= self.lambda_min,
              f"lambda_init ({self.lambda_init}) must be >= lambda_min ({self.lambda_min})")
        check(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
              f"device must be auto, cpu or cuda, got {self.device!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings that change the result (what a search may tune)."""
        return tuple(f.name for f in fields(cls) if f.name not in _UNTUNED)

    def flat(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], base: "KKTConfig | None" = None) -> "KKTConfig":
        """Build from a flat mapping (YAML, CLI overrides, a Tune config). Unknown keys are an error."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(f"kkt: unknown setting(s) {unknown}; valid: {valid}")
        vals = dict(values)
        for k in _INT_FIELDS:  # YAML/Optuna may hand back 3.0 for an integer
            if isinstance(vals.get(k), float) and vals[k].is_integer():
                vals[k] = int(vals[k])
        return replace(base or cls(), **vals)


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


@contextlib.contextmanager
def smooth_relu(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """Within the block, every nn.ReLU / nn.LeakyReLU submodule of `model` is a `SmoothReLU`.

    The original modules are put back on exit (also on error). ReLUs called functionally
    (F.relu inside a forward) are not affected; the classifiers of `attack.models` use modules.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, (nn.ReLU, nn.LeakyReLU)):
                    slope = child.negative_slope if isinstance(child, nn.LeakyReLU) else 0.0
                    setattr(parent, name, SmoothReLU(alpha, slope))
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


# ---- candidates and the attack ---------------------------------------------------------------------

class KKTCandidates(nn.Module):
    """The attack's trained state: candidate images x (m, C, H, W), coefficients lam (m,), labels (m,)."""

    def __init__(self, count: int, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.image_shape, self.num_classes = tuple(image_shape), int(num_classes)
        self.x = nn.Parameter(torch.zeros(count, *image_shape))
        self.lam = nn.Parameter(torch.ones(count))
        self.register_buffer("labels", torch.zeros(count, dtype=torch.long))

    def spec(self) -> dict[str, Any]:
        return {"count": len(self.lam), "image_shape": list(self.image_shape), "num_classes": self.num_classes}


def build_candidates(spec: dict[str, Any]) -> KKTCandidates:
    """Rebuild empty candidates from `KKTCandidates.spec()` (load the state dict afterwards)."""
    return KKTCandidates(int(spec["count"]), tuple(spec["image_shape"]), int(spec["num_classes"]))


def init_candidates(num_classes: int, per_class: int, image_shape: tuple[int, int, int], cfg: KKTConfig
                    ) -> KKTCandidates:
    """Class-balanced labels (class order), x = init_scale·N(0, 1), λ = lambda_init (free sign: ·N(0, 1))."""
    g = torch.Generator().manual_seed(cfg.seed)
    cand = KKTCandidates(num_classes * per_class, image_shape, num_classes)
    with torch.no_grad():
        cand.labels.copy_(torch.arange(num_classes).repeat_interleave(per_class))
        cand.x.copy_(cfg.init_scale * torch.randn(cand.x.shape, generator=g))
        lam = torch.randn(len(cand.lam), generator=g) if cfg.lambda_sign == "free" else torch.ones(len(cand.lam))
        cand.lam.copy_(cfg.lambda_init * lam)
    return cand


@torch.no_grad()
def project_lambdas(lam: torch.Tensor, cfg: KKTConfig) -> None:
    """In place: λ >= lambda_min for the positive form; the free form is unconstrained."""
    if cfg.lambda_sign == "positive":
        lam.clamp_(min=cfg.lambda_min)


# callback(step, record, candidates) -> True to stop early (as `train.train_generator`'s)
Callback = Callable[[int, dict[str, float], KKTCandidates], "bool | None"]


def run_kkt(classifier: nn.Module, num_classes: int, image_shape: tuple[int, int, int], cfg: KKTConfig, *,
            train_per_class: int, callback: Callback | None = None,
            log: Callable[[str], None] | None = print) -> AttackOutput:
    """Optimise candidates and coefficients for `cfg.steps` Adam steps; return them as an AttackOutput.

    Every step runs on `cfg.device`; losses are read back (and checked for NaN/inf) only at logged
    steps (every `cfg.log_every`, the first and the last).
    """
    if not isinstance(train_per_class, int) or train_per_class < 1:
        raise ConfigError(f"kkt: train_per_class must be a positive integer, got {train_per_class!r}")
    device = resolve_device(cfg.device)
    per_class = cfg.per_class or 2 * train_per_class
    classifier = classifier.to(device).eval().requires_grad_(False)
    theta = stationarity_parameters(classifier, cfg.layers)
    cand = init_candidates(num_classes, per_class, image_shape, cfg).to(device)
    opt = torch.optim.Adam([cand.x, cand.lam], lr=cfg.lr)
    history: list[dict[str, float]] = []
    t0, step = time.time(), 0
    with smooth_relu(classifier, cfg.alpha):
        for step in range(1, cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            res = residual_backward(classifier, theta, cand.x, cand.labels, cand.lam,
                                    soft=cfg.weight_decay_form, batch=cfg.batch)
            prior = range_prior(cand.x)
            if cfg.prior:
                (cfg.prior * prior).backward()
            opt.step()
            project_lambdas(cand.lam, cfg)
            if step % cfg.log_every and step not in (1, cfg.steps):
                continue
            seconds = time.time() - t0
            record = {"step": step, "loss": (res + cfg.prior * prior).item(), "loss_residual": res.item(),
                      "loss_prior": prior.item(), "seconds": seconds}
            if not math.isfinite(record["loss"]):
                raise NonFiniteLossError(f"kkt loss became non-finite by step {step} ({record}); lower lr "
                                         f"(now {cfg.lr}) or alpha (now {cfg.alpha})")
            history.append(record)
            if log:
                log(f"  kkt step {step:5d}/{cfg.steps}  loss {record['loss']:.5f}  residual {record['loss_residual']:.5f}"
                    f"  prior {record['loss_prior']:.5f}  ({step / max(seconds, 1e-9):.1f} steps/s)")
            if callback and callback(step, record, cand):
                break
    seconds = time.time() - t0
    cand = cand.cpu().eval()
    return AttackOutput(kind="kkt", images=cand.x.detach().clamp(0, 1).float(), labels=cand.labels.clone(),
                        module=cand, checkpoint_format=KKT_FORMAT, settings={**cfg.flat(), "per_class": per_class},
                        history=history, steps=step, seconds=seconds,
                        extra={"lambdas": cand.lam.detach().clone(), "train_per_class": train_per_class})
