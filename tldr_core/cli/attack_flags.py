"""The audit's attack flags beyond the TLDR basics: the image priors (``--bn --jitter --flip``) and one
``--kkt-<name>`` flag per field of :class:`~tldr_core.attack.kkt.KKTConfig`, generated from the
dataclass so a new KKT setting gets its flag without touching this file (its help line says so until
:data:`KKT_HELP` describes it), and ``--kkt-resume PATH`` (a run to continue, not a setting).

Values are parsed by type here (a malformed number is argparse's error, exit 2) and range-checked by
the config classes (ConfigError, also exit 2), before any work is done.
"""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from typing import Any, Callable

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights
from tldr_core.attack.kkt import LAMBDA_SIGNS, LAYERS, LR_SCHEDULES, KKTConfig
from tldr_core.attack.kkt_resume import load_resume
from tldr_core.attack.kkt_state import KKTResume

ATTACKS = ("tldr", "kkt")
#: KKTConfig fields with no --kkt- flag: the audit's --device serves both attacks.
KKT_SHARED = ("device",)
#: What each KKT setting does (help text); the default is appended from KKTConfig (or KKT_DEFAULT_TEXT).
KKT_HELP = {
    "per_class": "candidate images per class (the attacker is assumed to know the training set's size)",
    "steps": "Adam steps",
    "lr": "Adam learning rate of candidates and coefficients",
    "init_scale": "candidates start as init_scale * N(0, 1) noise",
    "lambda_init": "initial coefficient of every candidate",
    "lambda_min": "lower bound of the coefficients (lambda_sign positive)",
    "alpha": "sharpness of the sigmoid that replaces ReLU's derivative during extraction",
    "layers": "parameters in the stationarity equation",
    "prior": "weight of the prior keeping pixels in [0, 1]",
    "weight_decay_form": "soft margin, exact for cross-entropy + weight decay (false: hard margin)",
    "lambda_sign": "positive: coefficients >= lambda_min; free: any sign",
    "batch": "candidates per gradient chunk, bounds memory",
    "seed": "seed of the candidates' initialisation",
    "log_every": "log the losses every this many steps",
    "lr_schedule": "learning-rate schedule over the steps: constant, or cosine down to lr x lr_floor",
    "lr_floor": "cosine schedule: the last step's learning rate as a fraction of lr",
    "plateau_window": "stop once the residual improved by less than plateau_tol (relative) over this many steps; "
                      "0 = never",
    "plateau_tol": "relative improvement of the residual per plateau_window below which the run stops",
    "compile": "run the step as torch.func transforms through torch.compile (same numbers to rounding)",
}
#: Defaults that KKTConfig spells as None or the audit fills in.
KKT_DEFAULT_TEXT = {"per_class": "2 x the training images per class", "batch": "all at once",
                    "seed": "--seed, else 0"}
#: --kkt-resume's help, shared by the audit and the controls command.
KKT_RESUME_HELP = ("continue the run saved in this kkt.pt (its candidates and optimiser state) up to --kkt-steps, "
                   "counted from that run's start; the settings of the equation must be the same (default: a new run)")
_CHOICES = {"layers": LAYERS, "lambda_sign": LAMBDA_SIGNS, "lr_schedule": LR_SCHEDULES}
#: TLDR-only audit options (dest names) that make no sense with --attack kkt.
TLDR_ONLY = ("config", "variant", "mode", "steps", "batch_size", "lr", "epsilon", "perturbation", "grad_mode",
             "grad_scope", "per_class", "bn", "jitter", "flip") + tuple(f"w_{n}" for n in LossWeights.names())


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case) -> bool; anything else is an argparse error."""
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {text!r}")


def _kkt_type(name: str) -> tuple[Callable[[str], Any], str]:
    """(argparse type, metavar) of KKTConfig's field ``name``, from its type hint (Optional stripped)."""
    hint = typing.get_type_hints(KKTConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return parse_bool, "{true,false}"
    if hint is int:
        return int, "N"
    if hint is float:
        return float, "X"
    return str, ("{" + ",".join(_CHOICES[name]) + "}" if name in _CHOICES else "TEXT")


def kkt_flag(name: str) -> str:
    return "--kkt-" + name.replace("_", "-")


def add_kkt_flags(p: argparse.ArgumentParser) -> None:
    """One ``--kkt-<name>`` option (dest ``kkt_<name>``, default None) per KKTConfig field but --device's."""
    g = p.add_argument_group("KKT (stationarity) attack, with --attack kkt (docs/method.md section 8); the attacker "
                             "is assumed to know the training set's size: its images per class set the default "
                             "number of candidates")
    defaults = KKTConfig()
    for f in fields(KKTConfig):
        if f.name in KKT_SHARED:
            continue
        kind, metavar = _kkt_type(f.name)
        value = getattr(defaults, f.name)
        default = KKT_DEFAULT_TEXT.get(f.name, str(value).lower() if isinstance(value, bool) else value)
        g.add_argument(kkt_flag(f.name), dest=f"kkt_{f.name}", type=kind, default=None, metavar=metavar,
                       choices=_CHOICES.get(f.name),
                       help=f"{KKT_HELP.get(f.name, f'KKTConfig.{f.name}')} (default {default})")
    g.add_argument("--kkt-resume", dest="kkt_resume", default=None, metavar="PATH", help=KKT_RESUME_HELP)


def kkt_resume_from_args(args: argparse.Namespace) -> KKTResume | None:
    """The run --kkt-resume names (weights-only load; CheckpointError for a file that is not one), or None."""
    path = getattr(args, "kkt_resume", None)
    return None if path is None else load_resume(path)


def add_prior_flags(g: argparse._ArgumentGroup) -> None:
    """The TLDR image priors (AttackConfig.bn, jitter, flip); 0 = off, the default."""
    d = AttackConfig()
    g.add_argument("--bn", type=float, default=None, metavar="W",
                   help=f"weight of the BatchNorm-statistics prior (DeepInversion); 0 = off (default {d.bn:g})")
    g.add_argument("--jitter", type=int, default=None, metavar="PIXELS",
                   help=f"roll the classifier's inputs by up to this many pixels each step; 0 = off "
                        f"(default {d.jitter})")
    g.add_argument("--flip", type=parse_bool, default=None, metavar="{0,1}",
                   help="flip the classifier's inputs horizontally (whole batch, p = 0.5); 0 = off (default 0)")


def check_attack_flags(args: argparse.Namespace) -> None:
    """Flags of the other attack are an error (silently ignoring them would mislead)."""
    if args.attack == "kkt":
        given = [n for n in TLDR_ONLY if getattr(args, n, None) is not None]
        if given:
            names = ", ".join("--" + (n[2:] if n.startswith("w_") else n).replace("_", "-") for n in given)
            raise ConfigError(f"{names}: TLDR setting(s), not used by --attack kkt (its settings are the --kkt-* "
                              "flags; --seed and --device serve both)")
    else:
        given = [kkt_flag(f.name) for f in fields(KKTConfig) if getattr(args, f"kkt_{f.name}", None) is not None]
        given += ["--kkt-resume"] if getattr(args, "kkt_resume", None) is not None else []
        if given:
            raise ConfigError(f"{', '.join(given)}: only used with --attack kkt")


def kkt_config_from_args(args: argparse.Namespace) -> KKTConfig:
    """KKTConfig from the --kkt-* flags; --seed and --device fill seed and device when not given."""
    flat: dict[str, Any] = {f.name: getattr(args, f"kkt_{f.name}") for f in fields(KKTConfig)
                            if f.name not in KKT_SHARED and getattr(args, f"kkt_{f.name}") is not None}
    if "seed" not in flat and args.seed is not None:
        flat["seed"] = args.seed
    flat["device"] = args.device or "auto"
    if args.smoke_test:
        flat.setdefault("steps", 20)
        flat.setdefault("per_class", 4)
    return KKTConfig.from_flat(flat)
