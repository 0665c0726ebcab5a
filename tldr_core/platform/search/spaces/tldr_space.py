"""The TLDR search space of the search (`tune/search.py`): loaded from a YAML file a user can copy and edit.

The file (default: the packaged `spaces/tldr.yaml`, linked as `tune/space.yaml` in a checkout; read by
`load.load_space`) has four sections (each entry is parsed by `specs`), and may say `attack: tldr` (a
space for another attack is refused by name; `--attack kkt` spaces are `kkt_space`'s, reached through
`load_space(..., attack="kkt")` / `space_from_dict(..., attack="kkt")`):

    weights:          one entry per loss term named by `LossWeights.names()` (all nine, no more):
                        {low: L, high: H, allow_off: true}   log-uniform over [L, H]; `allow_off: true`
                                             lets the search also switch the term off (weight 0)
                        a number                       held fixed (0 = always off)
    params:           other `AttackConfig` fields the search varies (the image priors bn, jitter,
                      flip included; `fit_to_classifier` drops bn for a classifier without BatchNorm):
                        {choices: [a, b, ...]}         categorical
                        {low: L, high: H, log: bool}   float (log-uniform when log: true)
                        {low: L, high: H, int: true}   integer
                        any of these + when_on: [w, ...]  sampled only when one of those loss terms
                                                          is on (e.g. epsilon only matters with a
                                                          perturbed term); otherwise the default is kept
    fixed:            `AttackConfig` fields held constant in every trial (e.g. batch_size: 64)
    initial_points:   optional list of configurations (flat AttackConfig keys, weights by name) the
                      search evaluates first, e.g. a known good setting; the word `defaults` stands
                      for the current AttackConfig/LossWeights defaults (a warm start)

`steps`, `seed`, `device` and `per_class` are set by the search command, not by the space.
Everything is checked on load (`load.load_space`): an invalid file is one `ConfigError` naming the entry.

`SearchSpace` is Optuna's define-by-run function (Ray's `OptunaSearch(space=...)`): it is a plain
picklable object, so a search saved by Ray Tune can be resumed. A trial's Tune config holds the
Optuna parameters (`<weight>_on` switches included) plus the resolved AttackConfig values;
`SearchSpace.attack_flat()` picks the latter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights
from tldr_core.platform.search.spaces.specs import (TRIAL_NUMBER, ParamSpec, WeightSpec, check_attack, check_values,
                                                   describe_param, distribution, feature_value, initial_points,
                                                   param_dict, parse_param, parse_weight, suggest)

SWITCH_SUFFIX = "_on"
#: AttackConfig fields the search command controls itself; a space may not set them.
RESERVED = ("steps", "seed", "device", "per_class")
_SECTIONS = ("description", "attack", "weights", "params", "fixed", "initial_points")


def switch_name(weight: str) -> str:
    """Optuna parameter that switches loss term `weight` on or off."""
    return weight + SWITCH_SUFFIX


def _attack_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(AttackConfig) if f.name != "weights")


@dataclass
class SearchSpace:
    """A validated search space; call it with an Optuna trial (define-by-run)."""

    weights: dict[str, WeightSpec]
    params: dict[str, ParamSpec]
    fixed: dict[str, Any] = field(default_factory=dict)
    initial_points: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<dict>"
    attack = "tldr"  # a class attribute, not a field (kkt_space.KKTSearchSpace has "kkt")

    # ------------------------------------------------------------------ Optuna define-by-run
    def __call__(self, trial: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        number = getattr(trial, "number", None)
        for name in LossWeights.names():
            spec = self.weights[name]
            if not spec.searched:
                out[name] = spec.fixed
                continue
            on = trial.suggest_categorical(switch_name(name), [True, False]) if spec.off else True
            out[name] = trial.suggest_float(name, spec.low, spec.high, log=True) if on else 0.0
        for name, spec in self.params.items():
            if spec.when_on and not any(out[w] > 0 for w in spec.when_on):
                continue  # conditional parameter that does not apply: the default is kept
            out[name] = suggest(trial, spec)
        out.update(self.fixed)
        if isinstance(number, int):
            out[TRIAL_NUMBER] = number + 1
        return out

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def attack_flat(config: Mapping[str, Any]) -> dict[str, Any]:
        """The AttackConfig entries of a trial's Tune config (drops the `<weight>_on` switches)."""
        keys = set(_attack_fields()) | set(LossWeights.names())
        return {k: v for k, v in config.items() if k in keys}

    def attack_config(self, config: Mapping[str, Any], base: AttackConfig | None = None) -> AttackConfig:
        return AttackConfig.from_flat(self.attack_flat(config), base=base)

    def to_optuna_params(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """A flat AttackConfig-style point -> the Optuna parameters that reproduce it (for enqueueing)."""
        out: dict[str, Any] = {}
        weights_on: dict[str, bool] = {}
        for name in LossWeights.names():
            spec = self.weights[name]
            if name not in point or not spec.searched:
                weights_on[name] = (spec.fixed or 0) > 0 if not spec.searched else True
                continue
            value = float(point[name])
            weights_on[name] = value > 0
            if value > 0:
                if spec.off:
                    out[switch_name(name)] = True
                out[name] = value
            elif spec.off:
                out[switch_name(name)] = False
            else:
                raise ConfigError(f"initial point sets {name}=0 but the space does not allow switching {name} off")
        for name, spec in self.params.items():
            if name in point and (not spec.when_on or any(weights_on[w] for w in spec.when_on)):
                out[name] = point[name]
        return out

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every parameter (for rebuilding a study from recorded trials)."""
        import optuna.distributions as od

        d: dict[str, Any] = {}
        for name in LossWeights.names():
            spec = self.weights[name]
            if spec.searched:
                if spec.off:
                    d[switch_name(name)] = od.CategoricalDistribution([True, False])
                d[name] = od.FloatDistribution(spec.low, spec.high, log=True)
        for name, spec in self.params.items():
            d[name] = distribution(spec)
        return d

    def importance_features(self, flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(values, distributions) describing one trial for parameter importances.

        Every searched weight is one feature named like its parameter (`var`), valued on a log10 scale;
        a switched-off term is placed one decade below its range, so on/off and magnitude are one
        feature and all nine weights appear in every trial.
        Conditional params are included only where they applied.
        """
        import optuna.distributions as od

        values: dict[str, Any] = {}
        dists: dict[str, Any] = {}
        for name in LossWeights.names():
            spec = self.weights[name]
            if not spec.searched:
                continue
            lo, hi = math.log10(spec.low), math.log10(spec.high)
            floor = lo - 1 if spec.off else lo
            w = float(flat.get(name, 0.0))
            key = name  # the parameter's own name (log10 scale), as the summary shows it
            values[key] = min(max(math.log10(w), floor), hi) if w > 0 else floor
            dists[key] = od.FloatDistribution(floor, hi)
        for name, spec in self.params.items():
            if name not in flat:
                continue
            if spec.when_on and not any(float(flat.get(w, 0)) > 0 for w in spec.when_on):
                continue
            ok, v = feature_value(spec, flat[name])
            if ok:
                values[name], dists[name] = v, distribution(spec)
        return values, dists

    def describe(self) -> str:
        parts = []
        for name in LossWeights.names():
            s = self.weights[name]
            parts.append(f"{name}={s.fixed:g}" if not s.searched else
                         f"{name}~logU[{s.low:g},{s.high:g}]{'|off' if s.off else ''}")
        parts += [describe_param(s) for s in self.params.values()]
        parts += [f"{k}={v}" for k, v in self.fixed.items()]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The space as plain data (YAML/JSON), re-loadable with `space_from_dict`."""
        weights: dict[str, Any] = {}
        for name in LossWeights.names():
            s = self.weights[name]
            weights[name] = s.fixed if not s.searched else {"low": s.low, "high": s.high, "allow_off": s.off}
        params = {name: param_dict(s) for name, s in self.params.items()}
        return {"weights": weights, "params": params, "fixed": dict(self.fixed),
                "initial_points": [dict(p) for p in self.initial_points]}


def _weights(data: Mapping[str, Any]) -> dict[str, WeightSpec]:
    raw = data.get("weights") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("weights: must be a mapping of loss-term names")
    bad = sorted(set(raw) - set(LossWeights.names()))
    if bad:
        raise ConfigError(f"weights: unknown loss term(s) {bad}; valid: {list(LossWeights.names())}")
    missing = [n for n in LossWeights.names() if n not in raw]
    if missing:
        raise ConfigError(f"weights: no entry for {missing}; give each term a range "
                          "({low, high, allow_off}), a fixed number, or 0 to switch it off")
    return {n: parse_weight(n, raw[n]) for n in LossWeights.names()}


def _check_settings_section(sec: str, raw: Any) -> None:
    """params: / fixed: may only name AttackConfig fields that are neither weights nor RESERVED."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{sec}: must be a mapping")
    weights_there = sorted(set(raw) & set(LossWeights.names()))
    if weights_there:
        raise ConfigError(f"{sec}: {weights_there} are loss weights; put them under weights:")
    reserved = sorted(set(raw) & set(RESERVED))
    if reserved:
        raise ConfigError(f"{sec}: {reserved} are set by the search command (--steps, --seed, ...), not by the space")
    allowed = set(_attack_fields()) - set(RESERVED)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{sec}: unknown setting(s) {unknown}; valid: {sorted(allowed)}")


def _params_and_fixed(data: Mapping[str, Any], weights: dict[str, WeightSpec]
                      ) -> tuple[dict[str, ParamSpec], dict[str, Any]]:
    raw_p, raw_f = data.get("params") or {}, data.get("fixed") or {}
    _check_settings_section("params", raw_p)
    _check_settings_section("fixed", raw_f)
    both = sorted(set(raw_p) & set(raw_f))
    if both:
        raise ConfigError(f"{both} appear in both params: and fixed:")
    params = {n: parse_param(n, s, weights) for n, s in raw_p.items()}
    fixed = dict(raw_f)
    for n, v in fixed.items():
        check_values({n: v}, f"fixed.{n}")
    # the fixed part together with every weight at its range's low end must form a valid config
    probe = {n: (w.fixed if not w.searched else w.low) for n, w in weights.items()}
    check_values({**probe, **fixed}, "fixed")
    return params, fixed


def _initial_points(space: SearchSpace, raw: Any) -> list[dict[str, Any]]:
    """The `initial_points:` section, each point checked against the space (`defaults` expanded)."""
    def defaults() -> dict[str, Any]:  # today's AttackConfig/LossWeights defaults, for the searched parameters
        return {k: v for k, v in AttackConfig().flat().items()
                if k in space.weights and space.weights[k].searched or k in space.params}

    def check(p: dict[str, Any]) -> dict[str, Any]:
        AttackConfig.from_flat(dict(p))
        unknown = sorted(set(p) - set(LossWeights.names()) - set(space.params))
        if unknown:
            raise ConfigError(f"{unknown} are not searched parameters of this space")
        space.to_optuna_params(p)
        return p

    return initial_points(raw, defaults, check)


def tldr_space_from_dict(data: Any, source: str = "<dict>", attack: str = "tldr") -> SearchSpace:
    """Validate a parsed TLDR space (see the module docstring); raises ConfigError naming the bad entry,
    or saying that the file is for another attack than `attack`."""
    try:
        if not isinstance(data, Mapping):
            raise ConfigError("must hold a mapping with weights:, params:, fixed: (and optionally initial_points:)")
        check_attack(data, attack)
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; valid: {list(_SECTIONS)}")
        weights = _weights(data)
        params, fixed = _params_and_fixed(data, weights)
        space = SearchSpace(weights, params, fixed, [], source)
        space.initial_points = _initial_points(space, data.get("initial_points"))
        return space
    except ConfigError as exc:
        raise ConfigError(f"search space {source}: {exc}") from None
