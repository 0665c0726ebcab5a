"""Checking a checkpoint's ``spec`` before anything is built from it.

A model file is untrusted, and its spec decides how much memory ``build_classifier(spec)`` takes:
a 1 KB file saying ``hidden=2_000_000`` would otherwise allocate gigabytes before any other check.
So every size a spec can ask for is bounded (:data:`LIMITS`), the module is first built on the
``meta`` device (shapes only, no storage) to count its parameters and list the state dict it
expects, and the stored tensors must match those shapes exactly; only then is the real module built.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn


class SpecError(ValueError):
    """A spec or state dict that cannot describe a model we are willing to build (message says why)."""


#: The largest value each size in a spec may take. Generous for this tool's models (the paper's CNN
#: has ~0.5 M parameters, the 784-1000-1000-10 FC network 1.8 M) and far below what exhausts memory.
LIMITS: dict[str, int] = {
    "side": 4096,               # image height / width
    "channels": 16,             # image channels
    "num_classes": 100_000,
    "width": 65_536,            # any layer width: hidden, widths[i], conv width, latent_dim
    "depth": 64,                # hidden layers of an fc classifier
    "count": 1_000_000,         # KKT candidates
    "parameters": 100_000_000,  # parameters + buffers of the whole module (400 MB as float32)
}


def _int(spec: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"spec {key!r} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise SpecError(f"spec {key!r} = {v} is outside {lo}..{hi}")
    return v


def _dropout(spec: Mapping[str, Any], key: str = "dropout") -> float:
    v = spec.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise SpecError(f"spec {key!r} must be a number in [0, 1), got {v!r}")
    return float(v)


def _shape(spec: Mapping[str, Any], key: str) -> list[int]:
    v = spec.get(key)
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise SpecError(f"spec {key!r} must be [channels, height, width], got {v!r}")
    sub = {"c": v[0], "h": v[1], "w": v[2]}
    return [_int(sub, "c", 1, LIMITS["channels"]), _int(sub, "h", 1, LIMITS["side"]),
            _int(sub, "w", 1, LIMITS["side"])]


def _keys(spec: Mapping[str, Any], allowed: set[str], what: str) -> None:
    if not isinstance(spec, Mapping):
        raise SpecError(f"the {what} spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in set(spec) - allowed)
    if unknown:
        raise SpecError(f"unknown {what} spec key(s) {unknown}; known: {sorted(allowed)}")


def check_classifier_spec(spec: Any) -> dict[str, Any]:
    """The spec of a ``build_classifier`` model with every size within LIMITS (a clean copy), else SpecError."""
    from tldr_core.attack.models import ARCHS

    arch = spec.get("arch") if isinstance(spec, Mapping) else None
    if arch not in ARCHS:
        raise SpecError(f"unknown classifier architecture {arch!r}; known: {sorted(ARCHS)}")
    extra = {"cnn": {"dropout", "width", "hidden"}, "mlp": {"dropout", "hidden"},
             "fc": {"widths", "activation", "beta", "init_scale", "init_layers"}}[arch]
    _keys(spec, {"arch", "in_shape", "num_classes"} | extra, f"{arch} classifier")
    out: dict[str, Any] = {"arch": arch, "in_shape": _shape(spec, "in_shape"),
                           "num_classes": _int(spec, "num_classes", 1, LIMITS["num_classes"])}
    if "dropout" in extra and "dropout" in spec:
        out["dropout"] = _dropout(spec)
    if arch == "cnn":
        for key in ("width", "hidden"):
            if key in spec:
                out[key] = _int(spec, key, 1, LIMITS["width"])
        if min(out["in_shape"][1:]) < 4:
            raise SpecError(f"a cnn classifier needs images of at least 4x4, the spec says {out['in_shape']}")
    elif arch == "mlp" and "hidden" in spec:
        out["hidden"] = _int(spec, "hidden", 0, LIMITS["width"])
    elif arch == "fc":
        widths = spec.get("widths")
        if not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= LIMITS["depth"]:
            raise SpecError(f"spec 'widths' must be a list of 1..{LIMITS['depth']} layer widths, got "
                            f"{widths if not isinstance(widths, (list, tuple)) else f'{len(widths)} entries'}")
        out["widths"] = [_int({"widths[i]": w}, "widths[i]", 1, LIMITS["width"]) for w in widths]
        out.update(_fc_options(spec))
    return out


def _fc_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fc classifier's optional activation and init_layers (known names), softplus beta and
    init_scale (finite, > 0)."""
    from tldr_core.attack.models import ACTIVATIONS, INIT_LAYERS

    out: dict[str, Any] = {}
    for key, known in (("activation", ACTIVATIONS), ("init_layers", INIT_LAYERS)):
        if key in spec:
            if spec[key] not in known:
                raise SpecError(f"spec {key!r} must be one of {list(known)}, got {spec[key]!r}")
            out[key] = spec[key]
    for key in ("beta", "init_scale"):
        if key in spec:
            v = spec[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"spec {key!r} must be a finite number > 0, got {v!r}")
            out[key] = float(v)
    return out


def check_generator_spec(spec: Any) -> dict[str, Any]:
    """The spec of a ConditionedGenerator within LIMITS (a clean copy), else SpecError."""
    from tldr_core.attack.config import VARIANTS

    _keys(spec, {"variant", "num_classes", "image_shape", "latent_dim", "dropout", "width"}, "generator")
    if spec.get("variant") not in VARIANTS:
        raise SpecError(f"unknown generator variant {spec.get('variant')!r}; known: {list(VARIANTS)}")
    out: dict[str, Any] = {"variant": spec["variant"], "num_classes": _int(spec, "num_classes", 1, LIMITS["num_classes"]),
                           "image_shape": tuple(_shape(spec, "image_shape"))}
    for key in ("latent_dim", "width"):
        if key in spec:
            out[key] = _int(spec, key, 1, LIMITS["width"])
    if "dropout" in spec:
        out["dropout"] = _dropout(spec)
    return out


def check_candidates_spec(spec: Any) -> dict[str, Any]:
    """The spec of KKT candidates within LIMITS (a clean copy), else SpecError."""
    _keys(spec, {"count", "image_shape", "num_classes", "resumable"}, "KKT candidates")
    out = {"count": _int(spec, "count", 1, LIMITS["count"]), "image_shape": _shape(spec, "image_shape"),
           "num_classes": _int(spec, "num_classes", 1, LIMITS["num_classes"])}
    if "resumable" in spec:  # with Adam's state (kkt_state.KKTCandidates)
        if not isinstance(spec["resumable"], bool):
            raise SpecError(f"spec 'resumable' must be true or false, got {spec['resumable']!r}")
        out["resumable"] = spec["resumable"]
    return out


def expected_state(build: Callable[[dict], nn.Module], spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of ``build(spec)``, built on the meta device (no memory is allocated);
    SpecError when the module would exceed LIMITS["parameters"] or cannot be built."""
    try:
        with torch.device("meta"):
            module = build(dict(spec))
    except Exception as exc:  # noqa: BLE001 - a spec the architecture rejects (e.g. images too small)
        raise SpecError(f"cannot build the model from its spec {spec!r}: {type(exc).__name__}: {exc}") from None
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > LIMITS["parameters"]:
        raise SpecError(f"the spec asks for {total:,} parameters, more than the limit of "
                        f"{LIMITS['parameters']:,}; refused before allocating anything")
    return shapes


def check_state_dict(state: Any, expected: Mapping[str, tuple[int, ...]]) -> None:
    """The stored tensors must be exactly the keys and shapes the spec implies (SpecError names the first
    difference), so a spec cannot claim a different architecture than its weights."""
    if not isinstance(state, Mapping):
        raise SpecError(f"state_dict must be a mapping of names to tensors, got {type(state).__name__}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(str(k) for k in set(state) - set(expected))
    if missing or unexpected:
        raise SpecError(f"weights do not match the spec: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise SpecError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise SpecError(f"weights do not match the spec: {key} is {tuple(value.shape)}, the spec implies {shape}")
