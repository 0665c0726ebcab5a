"""Attack configuration: the nine loss weights and everything else a generator run needs.

Two layers only: the dataclass defaults below, then a YAML file and/or CLI flags on top.
`LossWeights`' field names are the single source of the loss-term names used by the losses,
the search space, MLflow params and metrics, and the report.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value or file that cannot be used (the message says which and why)."""


VARIANTS = ("label", "vector", "matrix", "vector-matrix")
MODES = ("inversion", "reconstruction")
GRAD_MODES = ("ghost", "per-sample", "batch", "loop")
PERTURBATIONS = ("fgsm", "random")
GRAD_SCOPES = ("head", "all")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the nine TLDR loss terms (docs/method.md §3-4). 0 switches a term off.

    kl      alpha   KL(P || Q): conditioning distribution vs classifier softmax
    kl_pert alpha'  the same on the L-inf perturbed images
    ce      beta    cross-entropy to the encoded label
    ce_pert beta'   the same on the perturbed images
    cos     gamma   mean pairwise cosine similarity of classifier features
    ortho   delta   feature Gram matrix distance from identity
    var     eta1    total variation ("variational" loss): noise-free images
    pix     eta2    pixels outside [0, 1]
    grad    eta3    norm of the classifier's weight gradient on the images
    """

    kl: float = 1.0
    kl_pert: float = 0.5
    ce: float = 1.0
    ce_pert: float = 0.5
    cos: float = 0.1
    ortho: float = 0.1
    var: float = 0.004
    pix: float = 1.0
    grad: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"loss weight {f.name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"loss weight {f.name!r} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "LossWeights | None" = None) -> "LossWeights":
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown loss weight(s) {unknown}; valid names: {list(cls.names())}")
        parsed = {}
        for k, v in values.items():
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise ConfigError(f"loss weight {k!r} must be a number, got {v!r}") from None
            parsed[k] = v
        return replace(base or cls(), **parsed)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def for_mode(self, mode: str) -> "LossWeights":
        """Inversion uses only the four terms of docs/method.md §3; the other five are zeroed."""
        if mode == "reconstruction":
            return self
        if mode == "inversion":
            keep = {"kl", "ce", "cos", "ortho"}
            return replace(self, **{n: 0.0 for n in self.names() if n not in keep})
        raise ConfigError(f"unknown mode {mode!r}; choose one of {MODES}")


@dataclass(frozen=True)
class AttackConfig:
    """Everything that determines one generator run against a fixed classifier."""

    variant: str = "vector-matrix"
    mode: str = "reconstruction"
    weights: LossWeights = field(default_factory=LossWeights)
    epsilon: float = 0.05          # L-inf radius of the perturbation e (images live in [0, 1])
    perturbation: str = "fgsm"     # fgsm: worst-case sign step; random: uniform sign noise
    grad_mode: str = "ghost"       # how the Grad term is computed (see losses.GRAD_FUNCS)
    grad_scope: str = "head"       # which weights θ: "head" (fully connected layers) or "all"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    latent_dim: int = 64
    gen_dropout: float = 0.3
    per_class: int = 20            # reconstructions per class drawn at the end
    seed: int = 0
    device: str = "auto"
    # Image priors (off by default; weights/settings beside the nine, never among them):
    bn: float = 0.0                # BatchNorm-statistics matching (DeepInversion, Yin et al. 2020)
    jitter: int = 0                # roll classifier inputs by up to this many pixels each step
    flip: bool = False             # flip classifier inputs horizontally (whole batch, p = 0.5)

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(self.variant in VARIANTS, f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        check(self.mode in MODES, f"unknown mode {self.mode!r}; choose one of {MODES}")
        check(self.perturbation in PERTURBATIONS,
              f"unknown perturbation {self.perturbation!r}; choose one of {PERTURBATIONS}")
        check(self.grad_mode in GRAD_MODES, f"unknown grad_mode {self.grad_mode!r}; choose one of {GRAD_MODES}")
        check(self.grad_scope in GRAD_SCOPES, f"unknown grad_scope {self.grad_scope!r}; choose one of {GRAD_SCOPES}")
        check(isinstance(self.weights, LossWeights), "weights must be a LossWeights")
        for name in ("steps", "batch_size", "latent_dim", "per_class"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        check(self.batch_size >= 2, "batch_size must be >= 2 (the diversity terms compare pairs)")
        for name in ("epsilon", "lr", "gen_dropout"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                  f"{name} must be a finite number >= 0, got {v!r}")
        check(self.lr > 0, "lr must be > 0")
        check(self.gen_dropout < 1, "gen_dropout must be < 1")
        # a YAML `device: 3` or `seed: abc` arrives here untyped: check types before using them
        check(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
              f"device must be auto, cpu or cuda, got {self.device!r}")
        check(isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool),
              f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # numpy integers from a search space -> int
        check(isinstance(self.bn, (int, float)) and not isinstance(self.bn, bool) and math.isfinite(self.bn)
              and self.bn >= 0, f"bn must be a finite number >= 0, got {self.bn!r}")
        object.__setattr__(self, "bn", float(self.bn))
        check(isinstance(self.jitter, int) and not isinstance(self.jitter, bool) and self.jitter >= 0,
              f"jitter must be an integer >= 0 (pixels), got {self.jitter!r}")
        check(isinstance(self.flip, bool), f"flip must be true or false, got {self.flip!r}")

    @property
    def effective_weights(self) -> LossWeights:
        return self.weights.for_mode(self.mode)

    def term_weights(self) -> dict[str, float]:
        """Weight of every loss term by name: the nine (for this mode) plus the BatchNorm prior "bn"."""
        return {**self.effective_weights.as_dict(), "bn": self.bn}

    def flat(self) -> dict[str, Any]:
        """Flat dict (weights spelled by their field names) for MLflow params and metrics.json."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        d.update(self.weights.as_dict())
        return d

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], base: "AttackConfig | None" = None) -> "AttackConfig":
        """Build from a flat mapping (YAML file, CLI overrides, a Tune config). Unknown keys are an error."""
        base = base or cls()
        names = {f.name for f in fields(cls)} - {"weights"}
        wnames = set(LossWeights.names())
        nested = values.get("weights", {}) if isinstance(values.get("weights", {}), Mapping) else None
        if nested is None:
            raise ConfigError("'weights' must be a mapping of loss-term names to numbers")
        unknown = sorted(set(values) - names - wnames - {"weights"})
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}; valid keys: "
                              f"{sorted(names)} and the loss weights {list(LossWeights.names())}")
        wvals = {**nested, **{k: v for k, v in values.items() if k in wnames}}
        weights = LossWeights.from_mapping(wvals, base=base.weights)
        other = {k: v for k, v in values.items() if k in names}
        for k in ("steps", "batch_size", "latent_dim", "per_class", "seed", "jitter"):
            if k in other and isinstance(other[k], float) and other[k].is_integer():
                other[k] = int(other[k])
        return replace(base, weights=weights, **other)


def load_yaml_config(path: str | Path, base: AttackConfig | None = None) -> AttackConfig:
    """Read an attack config from YAML (flat keys and/or a `weights:` mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        return AttackConfig.from_flat(data, base=base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
