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
backward uses sigmoid(α·x) (slope + (1 − slope)·sigmoid(α·x)) while its forward value is unchanged
(`kkt_loss`); smooth activations are left as they are.

Running to convergence. A run continues from its kkt.pt (`resume`: the candidates carry Adam's
moments and the step reached, `kkt_state`), so 2 × N steps resumed equal one run of 2N steps; it can
stop when the residual's relative improvement over `plateau_window` steps falls below `plateau_tol`
(off by default), and follow a cosine learning-rate schedule (off by default). `compile` runs the
step as torch.func transforms through torch.compile (same numbers to rounding).

BatchNorm and dropout: the classifier runs in eval mode, so BatchNorm is a fixed affine map with its
running statistics (its weight and bias are ordinary parameters of the stationarity equation with
layers="all") and dropout is off. A network trained with dropout or BatchNorm is stationary for its
training-mode objective, so the equation holds only approximately there.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tldr_core.attack.bounds import MAX_KKT_COUNT, check_kkt_candidates
from tldr_core.attack.config import ConfigError
from tldr_core.attack.kkt_loss import (LAYERS, SmoothReLU, StraightThroughSmoothReLU, functional_step,  # noqa: F401
                                       margins, range_prior, residual, residual_backward, smooth_relu,
                                       stationarity_loss, stationarity_parameters, weighted_margin_grad)
from tldr_core.attack.kkt_state import (KKTCandidates, KKTResume, build_candidates, check_resume,  # noqa: F401
                                        init_candidates, plateau_ref_of, project_lambdas, restore_optimizer,
                                        save_optimizer)
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.train import NonFiniteLossError, resolve_device

KKT_FORMAT = "tldr-kkt-candidates/1"
LAMBDA_SIGNS = ("positive", "free")
LR_SCHEDULES = ("constant", "cosine")
_INT_FIELDS = ("per_class", "steps", "batch", "seed", "log_every", "plateau_window")
_UNTUNED = ("batch", "seed", "device", "log_every", "compile")  # change speed or bookkeeping, not the result


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
    lr_schedule: str = "constant"  # constant, or cosine: from lr down to lr * lr_floor at step `steps`
    lr_floor: float = 0.01
    plateau_window: int = 0        # > 0: stop once the residual improved by less than plateau_tol
    plateau_tol: float = 1e-3      # (relative) over the last plateau_window steps; window 0 = off
    compile: bool = False          # the step as torch.func transforms through torch.compile

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"kkt: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("per_class", "batch"):
            v = getattr(self, name)
            check(v is None or (is_int(v) and v > 0), f"{name} must be a positive integer or None, got {v!r}")
        check(self.per_class is None or self.per_class <= MAX_KKT_COUNT,  # the data-dependent bound: run_kkt
              f"per_class must be at most {MAX_KKT_COUNT:,}, got {self.per_class!r}")
        for name in ("steps", "log_every"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        for name in ("lr", "init_scale", "lambda_init", "lambda_min", "alpha", "prior", "lr_floor",
                     "plateau_tol"):
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
        self._check_convergence(check, is_int)
        check(self.lambda_sign == "free" or self.lambda_init >= self.lambda_min,
              f"lambda_init ({self.lambda_init}) must be >= lambda_min ({self.lambda_min})")
        check(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
              f"device must be auto, cpu or cuda, got {self.device!r}")

    def _check_convergence(self, check: Callable[[bool, str], None], is_int: Callable[[Any], bool]) -> None:
        """The schedule, plateau-stop and compile settings."""
        check(self.lr_schedule in LR_SCHEDULES,
              f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        check(0 < self.lr_floor <= 1, f"lr_floor must be in (0, 1], got {self.lr_floor}")
        check(is_int(self.plateau_window) and self.plateau_window >= 0,
              f"plateau_window must be an integer >= 0, got {self.plateau_window!r}")
        check(self.plateau_tol >= 0, f"plateau_tol must be >= 0, got {self.plateau_tol}")
        check(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")

    def candidates_per_class(self, train_per_class: int) -> int:
        """Candidates per class: ``per_class``, else 2 per training image of the class (the 2n of Haim et al.)."""
        return self.per_class or 2 * train_per_class

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


# ---- the attack ----------------------------------------------------------------------------------

# callback(step, record, candidates) -> True to stop early (as `train.train_generator`'s)
Callback = Callable[[int, dict[str, float], KKTCandidates], "bool | None"]


def learning_rate(cfg: KKTConfig, step: int) -> float:
    """The learning rate of (1-based) `step`: lr, or with the cosine schedule lr · (floor + (1 − floor) ·
    (1 + cos(π (step − 1) / (steps − 1))) / 2), from lr at step 1 to lr · lr_floor at step `steps`."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(step - 1, cfg.steps - 1) / max(cfg.steps - 1, 1)
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))


def plateaued(cfg: KKTConfig, step: int, res: torch.Tensor, ref: float | None) -> tuple[bool, float | None]:
    """At every plateau_window-th step: (the residual improved by less than plateau_tol × the previous
    check's value, this check's value); in between (False, ref). Reads the residual only at checks."""
    if not cfg.plateau_window or step % cfg.plateau_window:
        return False, ref
    value = float(res)
    return ref is not None and ref - value < cfg.plateau_tol * ref, value


def _stepper(classifier: nn.Module, theta: dict[str, torch.Tensor], cand: KKTCandidates, cfg: KKTConfig
             ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """step() -> (residual, prior), with the loss's gradient in cand.x.grad and cand.lam.grad."""
    fn = functional_step(classifier, theta, cand.labels, soft=cfg.weight_decay_form, batch=cfg.batch,
                         compile=True) if cfg.compile else None

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        if fn is not None:
            res, cand.x.grad, cand.lam.grad = fn(cand.x, cand.lam)
        else:
            res = residual_backward(classifier, theta, cand.x, cand.labels, cand.lam, soft=cfg.weight_decay_form,
                                    batch=cfg.batch)
        prior = range_prior(cand.x)
        if cfg.prior:
            (cfg.prior * prior).backward()
        return res, prior
    return step


def _record(cfg: KKTConfig, step: int, res: torch.Tensor, prior: torch.Tensor, seconds: float) -> dict[str, Any]:
    """One history record (reads the losses back from the device); NonFiniteLossError on NaN / inf."""
    record = {"step": step, "loss": (res + cfg.prior * prior).item(), "loss_residual": res.item(),
              "loss_prior": prior.item(), "seconds": seconds}
    if cfg.lr_schedule != "constant":
        record["lr"] = learning_rate(cfg, step)
    if not math.isfinite(record["loss"]):
        raise NonFiniteLossError(f"kkt loss became non-finite by step {step} ({record}); lower lr "
                                 f"(now {cfg.lr}) or alpha (now {cfg.alpha})")
    return record


def run_kkt(classifier: nn.Module, num_classes: int, image_shape: tuple[int, int, int], cfg: KKTConfig, *,
            train_per_class: int, callback: Callback | None = None, log: Callable[[str], None] | None = print,
            resume: KKTResume | None = None) -> AttackOutput:
    """Optimise candidates and coefficients up to step `cfg.steps` (Adam); return them as an AttackOutput.

    resume: continue a run (its kkt.pt, `kkt_resume.load_resume`) from the step it reached; `steps`
    counts from the first run's start. Every step runs on `cfg.device`; losses are read back (and
    checked for NaN/inf) only at logged steps (every `cfg.log_every`, the first and the last) and at
    plateau checks. The last history record and extra["stop_reason"] say why it stopped: steps,
    plateau or callback.
    """
    if not isinstance(train_per_class, int) or train_per_class < 1:
        raise ConfigError(f"kkt: train_per_class must be a positive integer, got {train_per_class!r}")
    device = resolve_device(cfg.device)
    per_class = cfg.candidates_per_class(train_per_class)
    check_kkt_candidates(per_class, train_per_class, num_classes, image_shape)  # before allocating them
    if resume is not None:
        check_resume(resume, cfg, num_classes, per_class, image_shape)
    classifier = classifier.to(device).eval().requires_grad_(False)
    theta = stationarity_parameters(classifier, cfg.layers)
    cand = (copy.deepcopy(resume.candidates) if resume is not None
            else init_candidates(num_classes, per_class, image_shape, cfg)).to(device)
    opt = torch.optim.Adam([cand.x, cand.lam], lr=cfg.lr)
    if resume is not None:
        restore_optimizer(cand, opt)
    start, ref, stop = int(cand.step), plateau_ref_of(cand), "steps"
    history: list[dict[str, Any]] = []
    t0, step = time.time() - float(cand.seconds), int(cand.step)
    with smooth_relu(classifier, cfg.alpha, functional=cfg.compile):
        one_step = _stepper(classifier, theta, cand, cfg)
        for step in range(start + 1, cfg.steps + 1):
            if cfg.lr_schedule != "constant":
                opt.param_groups[0]["lr"] = learning_rate(cfg, step)
            opt.zero_grad(set_to_none=True)
            res, prior = one_step()
            opt.step()
            project_lambdas(cand.lam, cfg)
            flat, ref = plateaued(cfg, step, res, ref)
            if step % cfg.log_every and step not in (start + 1, cfg.steps) and not flat:
                continue
            record = _record(cfg, step, res, prior, time.time() - t0)
            history.append(record)
            if log:
                log(f"  kkt step {step:5d}/{cfg.steps}  loss {record['loss']:.5f}  residual {record['loss_residual']:.5f}"
                    f"  prior {record['loss_prior']:.5f}  ({step / max(record['seconds'], 1e-9):.1f} steps/s)")
            stop = "plateau" if flat else "callback" if callback and callback(step, record, cand) else stop
            if stop != "steps":
                break
    return _output(cand, opt, cfg, per_class, train_per_class, history, step, start, ref, stop, time.time() - t0)


def _output(cand: KKTCandidates, opt: torch.optim.Adam, cfg: KKTConfig, per_class: int, train_per_class: int,
            history: list[dict[str, Any]], step: int, start: int, ref: float | None, stop: str,
            seconds: float) -> AttackOutput:
    """The run as an AttackOutput: resumable candidates on the CPU (Adam's state saved in them)."""
    save_optimizer(cand, opt, step, ref, seconds)
    if history:
        history[-1] = {**history[-1], "stop": stop}
    cand = cand.cpu().eval()
    return AttackOutput(kind="kkt", images=cand.x.detach().clamp(0, 1).float(), labels=cand.labels.clone(),
                        module=cand, checkpoint_format=KKT_FORMAT, settings={**cfg.flat(), "per_class": per_class},
                        history=history, steps=step, seconds=seconds,
                        extra={"lambdas": cand.lam.detach().clone(), "train_per_class": train_per_class,
                               "stop_reason": stop, "resumed_from": start})
