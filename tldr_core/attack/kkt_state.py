"""The KKT attack's state: candidate images, their coefficients and labels, and what resuming a run
needs (Adam's moments, the step reached, the plateau stop's reference residual, the time spent).

`run_kkt` returns resumable candidates; their state dict is what kkt.pt holds (weights-only: tensors
and the flat settings in the checkpoint's meta), so a run continued from kkt.pt for N more steps
computes exactly what one run of all the steps computes (`KKTResume`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tldr_core.attack.config import ConfigError

#: Settings that define the equation being solved: a resumed run must keep them (lr, steps, the
#: schedule, the plateau stop, batch and compile may change; the seed and init only shape step 0).
EQUATION = ("layers", "weight_decay_form", "lambda_sign", "lambda_min", "alpha", "prior")
_UNSET = -1.0  # plateau_ref before the first check (a checkpoint holds finite values only)


class KKTCandidates(nn.Module):
    """The attack's trained state: candidate images x (m, C, H, W), coefficients lam (m,), labels (m,).

    resumable: also Adam's moments of x and lam, the step count, the plateau reference and the
    seconds spent, as buffers (so kkt.pt carries them); files written before had none.
    """

    def __init__(self, count: int, image_shape: tuple[int, int, int], num_classes: int,
                 resumable: bool = False) -> None:
        super().__init__()
        self.image_shape, self.num_classes, self.resumable = tuple(image_shape), int(num_classes), bool(resumable)
        self.x = nn.Parameter(torch.zeros(count, *image_shape))
        self.lam = nn.Parameter(torch.ones(count))
        self.register_buffer("labels", torch.zeros(count, dtype=torch.long))
        if resumable:
            for name, shape in (("x_avg", self.x.shape), ("x_sq", self.x.shape), ("lam_avg", (count,)),
                                ("lam_sq", (count,))):
                self.register_buffer(f"adam_{name}", torch.zeros(shape))
            self.register_buffer("step", torch.zeros((), dtype=torch.long))
            self.register_buffer("plateau_ref", torch.full((), _UNSET, dtype=torch.float64))
            self.register_buffer("seconds", torch.zeros((), dtype=torch.float64))

    def spec(self) -> dict[str, Any]:
        out = {"count": len(self.lam), "image_shape": list(self.image_shape), "num_classes": self.num_classes}
        return {**out, "resumable": True} if self.resumable else out


def build_candidates(spec: dict[str, Any]) -> KKTCandidates:
    """Rebuild empty candidates from `KKTCandidates.spec()` (load the state dict afterwards)."""
    return KKTCandidates(int(spec["count"]), tuple(spec["image_shape"]), int(spec["num_classes"]),
                         bool(spec.get("resumable", False)))


def init_candidates(num_classes: int, per_class: int, image_shape: tuple[int, int, int], cfg: Any
                    ) -> KKTCandidates:
    """Class-balanced labels (class order), x = init_scale·N(0, 1), λ = lambda_init (free sign: ·N(0, 1))."""
    g = torch.Generator().manual_seed(cfg.seed)
    cand = KKTCandidates(num_classes * per_class, image_shape, num_classes, resumable=True)
    with torch.no_grad():
        cand.labels.copy_(torch.arange(num_classes).repeat_interleave(per_class))
        cand.x.copy_(cfg.init_scale * torch.randn(cand.x.shape, generator=g))
        lam = torch.randn(len(cand.lam), generator=g) if cfg.lambda_sign == "free" else torch.ones(len(cand.lam))
        cand.lam.copy_(cfg.lambda_init * lam)
    return cand


@torch.no_grad()
def project_lambdas(lam: torch.Tensor, cfg: Any) -> None:
    """In place: λ >= lambda_min for the positive form; the free form is unconstrained."""
    if cfg.lambda_sign == "positive":
        lam.clamp_(min=cfg.lambda_min)


# ---- resuming ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KKTResume:
    """A run to continue: its candidates (resumable) and the flat settings it ran with (kkt.pt's meta["attack"])."""

    candidates: KKTCandidates
    settings: Mapping[str, Any]

    @property
    def step(self) -> int:
        return int(self.candidates.step)


def check_resume(resume: KKTResume, cfg: Any, num_classes: int, per_class: int,
                 image_shape: tuple[int, int, int]) -> None:
    """ConfigError unless `resume` is a run of the same problem that `cfg` can continue."""
    cand = resume.candidates
    if not cand.resumable:
        raise ConfigError("kkt: these candidates hold no optimiser state (written before resumable runs); "
                          "they cannot be resumed")
    want = (num_classes * per_class, tuple(image_shape), num_classes)
    if (len(cand.lam), cand.image_shape, cand.num_classes) != want:
        raise ConfigError(f"kkt: the run to resume has {len(cand.lam)} candidates of shape {cand.image_shape} for "
                          f"{cand.num_classes} classes; this one needs {want[0]} of {want[1]} for {want[2]}")
    changed = [f"{k} {resume.settings.get(k)!r} -> {getattr(cfg, k)!r}" for k in EQUATION
               if k in resume.settings and resume.settings[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"kkt: resuming solves the same equation; changed: {', '.join(changed)}")
    if resume.step >= cfg.steps:
        raise ConfigError(f"kkt: the run to resume has already made {resume.step} steps; ask for more than that "
                          f"(steps counts from the first run's start, now {cfg.steps})")


def restore_optimizer(cand: KKTCandidates, opt: torch.optim.Adam) -> None:
    """Put the moments and step count saved in `cand` into `opt` (Adam over [cand.x, cand.lam])."""
    step = float(cand.step)
    for p, name in ((cand.x, "x"), (cand.lam, "lam")):
        opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                        "exp_avg": getattr(cand, f"adam_{name}_avg").clone(),
                        "exp_avg_sq": getattr(cand, f"adam_{name}_sq").clone()}


@torch.no_grad()
def save_optimizer(cand: KKTCandidates, opt: torch.optim.Adam, step: int, plateau_ref: float | None,
                   seconds: float) -> None:
    """Copy `opt`'s moments (and the step, plateau reference, seconds) into `cand`'s buffers."""
    for p, name in ((cand.x, "x"), (cand.lam, "lam")):
        state = opt.state.get(p)
        if state:
            getattr(cand, f"adam_{name}_avg").copy_(state["exp_avg"])
            getattr(cand, f"adam_{name}_sq").copy_(state["exp_avg_sq"])
    cand.step.fill_(step)
    cand.plateau_ref.fill_(_UNSET if plateau_ref is None else plateau_ref)
    cand.seconds.fill_(seconds)


def plateau_ref_of(cand: KKTCandidates) -> float | None:
    ref = float(cand.plateau_ref) if cand.resumable else _UNSET
    return None if ref == _UNSET or not math.isfinite(ref) else ref
