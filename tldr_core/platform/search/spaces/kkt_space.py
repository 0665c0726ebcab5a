"""The search space of a KKT (stationarity) search, `python tune/search.py --attack kkt`: loaded from a
YAML file (default: the packaged `spaces/kkt.yaml`, linked as `tune/kkt.yaml` in a checkout).

    attack:          kkt (optional; a TLDR space given with --attack kkt is refused by name)
    params:          `KKTConfig.names()` settings the search varies, each parsed like a TLDR space's
                     params (`specs.parse_param`): {choices: [...]}, {low, high, log: bool},
                     {low, high, int: true}; no when_on (KKT has no loss terms to condition on)
    fixed:           KKTConfig settings held constant (`KKTConfig.names()`, and `batch`, the memory bound)
    initial_points:  configurations evaluated first; the word `defaults` stands for KKTConfig's own
                     defaults of the searched settings (the packaged space starts with it, so every
                     search can be compared with its own first trial)

`steps` is the search command's `--steps`; `seed`, `device` and `log_every` are set by the search too
(they are not `KKTConfig.names()`). Every range bound and every choice is checked through
`KKTConfig` together with the fixed settings; an initial point must lie inside the searched ranges.
`KKTSearchSpace` offers the interface of `tldr_space.SearchSpace` that the search, its trials and
its summary use (Optuna define-by-run call, `attack_config`, `to_optuna_params`, importances, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from tldr_core.attack.config import ConfigError
from tldr_core.attack.kkt import KKTConfig
from tldr_core.platform.search.spaces.specs import (TRIAL_NUMBER, ParamSpec, check_attack, describe_param, distribution,
                                                   feature_value, initial_points, match_choice, param_dict, parse_param,
                                                   suggest)

#: KKTConfig fields the search command sets itself (--steps); a space may not name them.
RESERVED = ("steps",)
_SECTIONS = ("description", "attack", "params", "fixed", "initial_points")
_FIXED_ONLY = ("batch",)  # changes memory and speed, not the result: may be fixed, never searched


def _checker(fixed: Mapping[str, Any]):
    """check(values, where) through KKTConfig, with the fixed settings applied (lambda_min vs lambda_init)."""
    def check(values: Mapping[str, Any], where: str) -> None:
        try:
            KKTConfig.from_flat({**fixed, **values})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return check


@dataclass
class KKTSearchSpace:
    """A validated KKT search space; call it with an Optuna trial (define-by-run)."""

    params: dict[str, ParamSpec]
    fixed: dict[str, Any] = field(default_factory=dict)
    initial_points: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<dict>"
    attack = "kkt"

    def __call__(self, trial: Any) -> dict[str, Any]:
        out = {name: suggest(trial, spec) for name, spec in self.params.items()}
        out.update(self.fixed)
        if isinstance(getattr(trial, "number", None), int):
            out[TRIAL_NUMBER] = trial.number + 1
        return out

    @staticmethod
    def attack_flat(config: Mapping[str, Any]) -> dict[str, Any]:
        """The KKTConfig entries of a trial's Tune config (drops the trial number)."""
        keys = {f.name for f in fields(KKTConfig)}
        return {k: v for k, v in config.items() if k in keys}

    def attack_config(self, config: Mapping[str, Any], base: KKTConfig | None = None) -> KKTConfig:
        return KKTConfig.from_flat(self.attack_flat(config), base=base)

    def to_optuna_params(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """A flat KKTConfig-style point -> the Optuna parameters that reproduce it (for enqueueing)."""
        unknown = sorted(set(point) - set(self.params))
        if unknown:
            raise ConfigError(f"{unknown} are not searched parameters of this space (searched: {sorted(self.params)})")
        out: dict[str, Any] = {}
        for name, value in point.items():
            spec = self.params[name]
            if spec.kind == "categorical":
                found, value = match_choice(value, spec.choices)
                if not found:
                    raise ConfigError(f"{name}={point[name]!r} is not one of the choices {list(spec.choices)}")
            elif (isinstance(value, bool) or not isinstance(value, (int, float))
                  or not spec.low <= value <= spec.high):
                raise ConfigError(f"{name}={value!r} is outside the searched range [{spec.low:g}, {spec.high:g}]")
            out[name] = value
        return out

    def distributions(self) -> dict[str, Any]:
        return {name: distribution(spec) for name, spec in self.params.items()}

    def importance_features(self, flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(values, distributions) of one recorded trial for parameter importances (the searched params)."""
        values: dict[str, Any] = {}
        dists: dict[str, Any] = {}
        for name, spec in self.params.items():
            if name in flat:
                ok, v = feature_value(spec, flat[name])
                if ok:
                    values[name], dists[name] = v, distribution(spec)
        return values, dists

    def describe(self) -> str:
        return ", ".join([describe_param(s) for s in self.params.values()] + [f"{k}={v}" for k, v in self.fixed.items()])

    def as_dict(self) -> dict[str, Any]:
        """The space as plain data (YAML/JSON), re-loadable with `kkt_space_from_dict`."""
        return {"attack": "kkt", "params": {n: param_dict(s) for n, s in self.params.items()},
                "fixed": dict(self.fixed), "initial_points": [dict(p) for p in self.initial_points]}


def _names_section(sec: str, raw: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """params: / fixed: as a mapping naming only KKTConfig.names() (+ `extra`), none RESERVED."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{sec}: must be a mapping of KKTConfig settings")
    reserved = sorted(set(raw) & set(RESERVED))
    if reserved:
        raise ConfigError(f"{sec}: {reserved} are set by the search command (--steps), not by the space")
    allowed = sorted(set(KKTConfig.names()) - set(RESERVED) | set(extra))
    unknown = sorted(map(str, set(raw) - set(allowed)))
    if unknown:
        raise ConfigError(f"{sec}: unknown setting(s) {unknown}; valid: {allowed}")
    return dict(raw)


def _initial_points(space: KKTSearchSpace, raw: Any) -> list[dict[str, Any]]:
    """The `initial_points:` section; `defaults` is KKTConfig's defaults of the searched settings."""
    def check(p: dict[str, Any]) -> dict[str, Any]:
        _checker(space.fixed)(dict(p), "values")
        return space.to_optuna_params(p)  # in range, choices matched

    return initial_points(raw, lambda: {k: v for k, v in KKTConfig().flat().items() if k in space.params}, check)


def kkt_space_from_dict(data: Any, source: str = "<dict>") -> KKTSearchSpace:
    """Validate a parsed KKT space (see the module docstring); raises ConfigError naming the bad entry."""
    try:
        if not isinstance(data, Mapping):
            raise ConfigError("must hold a mapping with params:, fixed: (and optionally initial_points:)")
        check_attack(data, "kkt")
        unknown = sorted(map(str, set(data) - set(_SECTIONS)))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; valid: {list(_SECTIONS)}")
        raw_p = _names_section("params", data.get("params") or {})
        fixed = _names_section("fixed", data.get("fixed") or {}, _FIXED_ONLY)
        both = sorted(set(raw_p) & set(fixed))
        if both:
            raise ConfigError(f"{both} appear in both params: and fixed:")
        _checker({})(fixed, "fixed")
        check = _checker(fixed)
        params = {n: parse_param(n, s, {}, check) for n, s in raw_p.items()}
        space = KKTSearchSpace(params, fixed, [], source)
        space.initial_points = _initial_points(space, data.get("initial_points"))
        return space
    except ConfigError as exc:
        raise ConfigError(f"search space {source}: {exc}") from None
