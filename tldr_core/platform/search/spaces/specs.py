"""The entries of a search-space file, parsed and checked one at a time: a loss weight (`WeightSpec`:
a log-uniform range that may be switched off, or a fixed value) and another attack setting
(`ParamSpec`: categorical, float or integer, optionally conditional on loss terms being on).
Every problem is one `ConfigError` naming the entry (`weights.kl`, `params.epsilon.when_on`, ...).

A `ParamSpec` is checked against the attack's config class through a `Checker` (default: the TLDR
`AttackConfig`; the KKT space passes its own), and the helpers at the end (`suggest`, `distribution`,
`feature_value`, `describe_param`, `param_dict`) are shared by both search spaces, with what both
spaces' files and trials agree on: the attacks (`ATTACKS`, `check_attack`) and `TRIAL_NUMBER`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights

#: The attacks a search can run (--attack); each has its own space (`tldr_space`, `kkt_space`).
ATTACKS = ("tldr", "kkt")
#: Key of a trial's Tune config holding its 1-based trial number (Optuna's trial number + 1).
TRIAL_NUMBER = "trial_number"


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class WeightSpec:
    """One loss weight: searched log-uniformly over [low, high] (switchable off when `off`), or `fixed`."""

    name: str
    low: float | None = None     # None: fixed
    high: float | None = None
    off: bool = False            # may the search switch the term off?
    fixed: float | None = None

    @property
    def searched(self) -> bool:
        return self.fixed is None


@dataclass(frozen=True)
class ParamSpec:
    """One other AttackConfig setting the search varies; sampled only when a `when_on` term is on."""

    name: str
    kind: str                    # "categorical" | "float" | "int"
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    when_on: tuple[str, ...] = ()


def check_values(values: Mapping[str, Any], where: str) -> None:
    """ConfigError (prefixed with `where`) unless `values` form a valid flat AttackConfig."""
    try:
        AttackConfig.from_flat(dict(values))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: check(values, where): ConfigError prefixed with `where` unless `values` form a valid flat config.
Checker = Callable[[Mapping[str, Any], str], None]


def parse_weight(name: str, spec: Any) -> WeightSpec:
    """`weights.<name>`: a number (fixed; 0 = off) or {low, high, allow_off}."""
    where = f"weights.{name}"
    if not isinstance(spec, Mapping):
        value = _num(spec, where)
        if value < 0:
            raise ConfigError(f"{where} must be >= 0, got {value}")
        return WeightSpec(name, fixed=value)
    unknown = sorted(map(str, set(spec) - {"low", "high", "allow_off"}))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; use low, high and allow_off "
                          "(note: a bare YAML key `off` reads as false)")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where} needs both low and high (log-uniform range), or a single number to fix it")
    low, high = _num(spec["low"], f"{where}.low"), _num(spec["high"], f"{where}.high")
    if not 0 < low < high:
        raise ConfigError(f"{where}: need 0 < low < high for a log-uniform range, got low={low}, high={high}")
    off = spec.get("allow_off", False)
    if not isinstance(off, bool):
        raise ConfigError(f"{where}.allow_off must be true or false, got {off!r}")
    return WeightSpec(name, low, high, off)


def _when_on(name: str, spec: Mapping[str, Any], weights: Mapping[str, WeightSpec]) -> tuple[str, ...]:
    where = f"params.{name}.when_on"
    when = spec.get("when_on", [])
    if isinstance(when, str):
        when = [when]
    if not isinstance(when, list) or not all(isinstance(w, str) for w in when):
        raise ConfigError(f"{where} must be a list of loss-term names")
    bad = sorted(set(when) - set(LossWeights.names()))
    if bad:
        raise ConfigError(f"{where}: unknown loss term(s) {bad}; valid: {list(LossWeights.names())}")
    never = [w for w in when if weights[w].fixed == 0]
    if when and len(never) == len(when):
        raise ConfigError(f"{where}: the term(s) {never} are always off, so {name} would never be sampled")
    return tuple(when)


def _parse_choices(name: str, spec: Mapping[str, Any], when: tuple[str, ...], check: Checker) -> ParamSpec:
    where = f"params.{name}"
    if any(k in spec for k in ("low", "high", "log", "int")):
        raise ConfigError(f"{where}: give either choices or a low/high range, not both")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices must be a non-empty list")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}.choices has duplicates: {choices}")
    for c in choices:
        if not (c is None or isinstance(c, (bool, int, float, str))):
            raise ConfigError(f"{where}.choices: {c!r} is not a plain value")
        check({name: c}, f"{where}.choices")
    return ParamSpec(name, "categorical", choices=tuple(choices), when_on=when)


def _parse_range(name: str, spec: Mapping[str, Any], when: tuple[str, ...], check: Checker) -> ParamSpec:
    where = f"params.{name}"
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where} needs choices, or both low and high")
    is_int, log = spec.get("int", False), spec.get("log", False)
    if not isinstance(is_int, bool) or not isinstance(log, bool):
        raise ConfigError(f"{where}: log and int must be true or false")
    low, high = _num(spec["low"], f"{where}.low"), _num(spec["high"], f"{where}.high")
    if not low < high:
        raise ConfigError(f"{where}: need low < high, got low={low}, high={high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if is_int:
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: an integer range needs integer bounds")
        low, high = int(low), int(high)
    for bound in (low, high):
        check({name: bound}, where)
    return ParamSpec(name, "int" if is_int else "float", low=low, high=high, log=log, when_on=when)


def parse_param(name: str, spec: Any, weights: Mapping[str, WeightSpec], check: Checker = check_values) -> ParamSpec:
    """`params.<name>`: {choices: [...]} or {low, high, log, int}, each optionally with when_on (a
    space without loss weights passes `weights={}`: when_on is then refused)."""
    where = f"params.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping ({{choices: [...]}} or {{low: .., high: ..}}); "
                          "put constants under fixed:")
    unknown = sorted(set(spec) - {"choices", "low", "high", "log", "int", "when_on"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; use choices, or low/high/log/int, and when_on")
    if "when_on" in spec and not weights:
        raise ConfigError(f"{where}.when_on: this attack has no loss terms to condition on")
    when = _when_on(name, spec, weights)
    return _parse_choices(name, spec, when, check) if "choices" in spec else _parse_range(name, spec, when, check)


# ---- shared by the search spaces: sampling, Optuna distributions, importances, description ------

def suggest(trial: Any, spec: ParamSpec) -> Any:
    """Draw `spec` from an Optuna trial (define-by-run)."""
    if spec.kind == "categorical":
        return trial.suggest_categorical(spec.name, list(spec.choices))
    if spec.kind == "int":
        return trial.suggest_int(spec.name, spec.low, spec.high, log=spec.log)
    return trial.suggest_float(spec.name, spec.low, spec.high, log=spec.log)


def distribution(spec: ParamSpec) -> Any:
    """The Optuna distribution `suggest` draws from."""
    import optuna.distributions as od

    if spec.kind == "categorical":
        return od.CategoricalDistribution(list(spec.choices))
    if spec.kind == "int":
        return od.IntDistribution(spec.low, spec.high, log=spec.log)
    return od.FloatDistribution(spec.low, spec.high, log=spec.log)


def match_choice(value: Any, choices: tuple) -> tuple[bool, Any]:
    """(found, the choice) for a value read back from MLflow, where every param is a string
    ("True", "0", "all"): equal values first, then equal spellings."""
    for c in choices:
        if type(c) is type(value) and c == value:
            return True, c
    for c in choices:
        if str(c) == str(value) or (not isinstance(c, (bool, str)) and not isinstance(value, (bool, str))
                                    and c == value):
            return True, c
    return False, None


def feature_value(spec: ParamSpec, value: Any) -> tuple[bool, Any]:
    """(usable, value) of a recorded trial's param for importances: a known choice, or a number in range."""
    if spec.kind == "categorical":
        return match_choice(value, spec.choices)
    try:
        v = float(value) if spec.kind == "float" else int(float(value))
    except (TypeError, ValueError):
        return False, None
    return (spec.low <= v <= spec.high), v


def describe_param(spec: ParamSpec) -> str:
    rng = "{" + ",".join(map(str, spec.choices)) + "}" if spec.kind == "categorical" else \
        f"{'logU' if spec.log else 'U'}[{spec.low:g},{spec.high:g}]{' int' if spec.kind == 'int' else ''}"
    return f"{spec.name}~{rng}" + (f" if {'|'.join(spec.when_on)} on" if spec.when_on else "")


def param_dict(spec: ParamSpec) -> dict[str, Any]:
    """The YAML entry that `parse_param` turns back into `spec`."""
    p: dict[str, Any] = ({"choices": list(spec.choices)} if spec.kind == "categorical" else
                         {"low": spec.low, "high": spec.high, "log": spec.log, **({"int": True} if spec.kind == "int" else {})})
    if spec.when_on:
        p["when_on"] = list(spec.when_on)
    return p


#: The word that stands for "the attack's own defaults" in a space's `initial_points:` section.
DEFAULTS_POINT = "defaults"


def initial_points(raw: Any, defaults: Callable[[], dict[str, Any]],
                   check: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The `initial_points:` section of a space (TLDR or KKT): a list of mappings or the word
    `defaults` (expanded by ``defaults()``); ``check`` validates one point against the space and
    returns the point to keep. Errors name the point's position."""
    raw = raw or []
    if not isinstance(raw, list) or not all(isinstance(p, Mapping) or p == DEFAULTS_POINT for p in raw):
        raise ConfigError(f"initial_points: must be a list of mappings (or the word {DEFAULTS_POINT!r})")
    points = []
    for i, p in enumerate(raw):
        try:
            points.append(dict(check(dict(defaults() if p == DEFAULTS_POINT else p))))
        except ConfigError as exc:
            raise ConfigError(f"initial_points[{i}]: {exc}") from None
    return points


def check_attack(data: Mapping[str, Any], attack: str) -> None:
    """ConfigError when a space file is meant for another attack than `attack` (its `attack:` key, or
    `weights:`, which only a TLDR space has)."""
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
    declared = data.get("attack", "kkt" if attack == "kkt" and "weights" not in data else "tldr")
    if declared not in ATTACKS:
        raise ConfigError(f"attack: must be one of {ATTACKS}, got {declared!r}")
    if declared != attack:
        wanted = "tune/kkt.yaml" if attack == "kkt" else "tune/space.yaml"
        why = "attack: " + declared if "attack" in data else "it has weights:"
        raise ConfigError(f"this is a {declared} search space ({why}), not a {attack} one; pass --attack {declared}, "
                          f"or a {attack} space such as {wanted}")
