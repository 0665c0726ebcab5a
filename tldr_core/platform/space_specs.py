"""The entries of a search-space file, parsed and checked one at a time: a loss weight (`WeightSpec`:
a log-uniform range that may be switched off, or a fixed value) and another AttackConfig setting
(`ParamSpec`: categorical, float or integer, optionally conditional on loss terms being on).
Every problem is one `ConfigError` naming the entry (`weights.kl`, `params.epsilon.when_on`, ...)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights


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


def _parse_choices(name: str, spec: Mapping[str, Any], when: tuple[str, ...]) -> ParamSpec:
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
        check_values({name: c}, f"{where}.choices")
    return ParamSpec(name, "categorical", choices=tuple(choices), when_on=when)


def _parse_range(name: str, spec: Mapping[str, Any], when: tuple[str, ...]) -> ParamSpec:
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
        check_values({name: bound}, where)
    return ParamSpec(name, "int" if is_int else "float", low=low, high=high, log=log, when_on=when)


def parse_param(name: str, spec: Any, weights: Mapping[str, WeightSpec]) -> ParamSpec:
    """`params.<name>`: {choices: [...]} or {low, high, log, int}, each optionally with when_on."""
    where = f"params.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping ({{choices: [...]}} or {{low: .., high: ..}}); "
                          "put constants under fixed:")
    unknown = sorted(set(spec) - {"choices", "low", "high", "log", "int", "when_on"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; use choices, or low/high/log/int, and when_on")
    when = _when_on(name, spec, weights)
    return _parse_choices(name, spec, when) if "choices" in spec else _parse_range(name, spec, when)
