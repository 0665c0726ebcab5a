"""Saving and loading model files without ever running pickled code.

The models this platform audits are untrusted files, so every load uses `torch.load(weights_only=True)`:
only tensors and plain containers are accepted. A checkpoint is a dict
`{"format": ..., "spec": {...}, "state_dict": {...}, "meta": {...}}`; `spec` rebuilds the module.

Formats and their loaders (`LOADERS`, or `load_module(path, fmt)`): the classifier, the TLDR
generator and the KKT attack's candidates (`kkt.KKT_FORMAT`, what `run_kkt`'s AttackOutput.module
is saved with).

Before anything is built, every loader bounds the file's size and every size its spec asks for,
and checks the stored tensors' shapes against the spec on the meta device
(:mod:`tldr_core.attack.model_specs`); `meta` must be a mapping of plain values. Every loader
(audit `--classifier`, `search --classifier`, the re-audit, the registry) goes through `_build`.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tldr_core.attack.kkt import KKT_FORMAT, KKTCandidates, build_candidates
from tldr_core.attack.model_specs import (LIMITS, SpecError, check_candidates_spec, check_classifier_spec,
                                          check_generator_spec, check_state_dict, expected_state)
from tldr_core.attack.models import ConditionedGenerator, build_classifier

CLASSIFIER_FORMAT = "tldr-classifier/1"
GENERATOR_FORMAT = "tldr-generator/1"
#: No model within LIMITS["parameters"] (float32) needs a bigger file; larger files are not even read.
MAX_FILE_BYTES = 4 * LIMITS["parameters"] + (64 << 20)


class CheckpointError(ValueError):
    """A model file that cannot be used: unreadable, not ours, code-carrying, or the wrong shape."""


def save_checkpoint(path: str | Path, module: nn.Module, fmt: str, meta: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": fmt, "spec": module.spec(),
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, "meta": meta or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read(path: str | Path, fmt: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes, more than any model within the limits "
                              f"needs ({MAX_FILE_BYTES:,}); refused without reading it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if msg else ""
        if "global" in msg.lower():  # the pickle names a Python callable: code the loader would run
            raise CheckpointError(f"{path} refused: it references Python objects other than tensors (code that "
                                  f"would run on load); only weights-only checkpoints are loaded ({detail})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    except Exception as exc:  # truncated zip, random bytes, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {fmt} checkpoint (found format {found!r})")
    return payload


def _load(path: str | Path, fmt: str, build: Callable[[dict], nn.Module],
          check_spec: Callable[[Any], dict]) -> tuple[nn.Module, dict[str, Any]]:
    return _build(path, _read(path, fmt), build, check_spec)


def _meta(path: str | Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's meta: a mapping with string keys whose values metrics.json can record."""
    meta = payload.get("meta", {})
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise CheckpointError(f"{path}: 'meta' must be a mapping with string keys, got {type(meta).__name__}")
    try:
        json.dumps(meta, default=float)  # how metrics.json records it; a tensor of many values would fail there
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: 'meta' must hold plain values (numbers, strings, lists, mappings): "
                              f"{type(exc).__name__}: {exc}") from None
    return dict(meta)


def _build(path: str | Path, payload: dict[str, Any], build: Callable[[dict], nn.Module],
           check_spec: Callable[[Any], dict]) -> tuple[nn.Module, dict[str, Any]]:
    """Check the spec's sizes and the stored shapes (no allocation), then build and load for real."""
    meta = _meta(path, payload)
    try:
        spec = check_spec(payload.get("spec"))
        check_state_dict(payload.get("state_dict"), expected_state(build, spec))
    except SpecError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    broken = [k for k, v in payload["state_dict"].items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if broken:  # a model trained into NaN: every loss built on it is NaN, whatever the attack's settings
        raise CheckpointError(f"{path}: its weights hold NaN or infinite values ({', '.join(broken[:3])}"
                              f"{', ...' if len(broken) > 3 else ''}); such a model cannot be audited")
    try:
        module = build(spec)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build the model from its spec {payload.get('spec')!r}: {exc}") from None
    try:
        module.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"{path}: weights do not match the architecture {payload['spec']!r}: {first}") from None
    return module.eval(), meta


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(classifier in eval mode with frozen parameters, its meta dict)."""
    model, meta = _load(path, CLASSIFIER_FORMAT, build_classifier, check_classifier_spec)
    model.requires_grad_(False)
    return model, meta


def load_generator(path: str | Path) -> tuple[ConditionedGenerator, dict[str, Any]]:
    def build(spec: dict) -> nn.Module:
        spec = dict(spec)
        spec["image_shape"] = tuple(spec["image_shape"])
        return ConditionedGenerator(**spec)
    return _load(path, GENERATOR_FORMAT, build, check_generator_spec)


def load_kkt_candidates(path: str | Path) -> tuple[KKTCandidates, dict[str, Any]]:
    """(KKT candidates in eval mode, their meta dict): images x (m, C, H, W), coefficients lam (m,), labels (m,).

    The spec is checked against the stored tensors before anything is allocated (a spec naming a
    huge count would otherwise allocate it; see `_build`), and the labels must be classes of the spec."""
    cand, meta = _build(path, _read(path, KKT_FORMAT), build_candidates, check_candidates_spec)
    labels = cand.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cand.num_classes):
        raise CheckpointError(f"{path}: candidate labels outside 0..{cand.num_classes - 1}")
    return cand, meta


#: Every checkpoint format and its loader; all read with torch.load(weights_only=True).
LOADERS: dict[str, Callable[[str | Path], tuple[nn.Module, dict[str, Any]]]] = {
    CLASSIFIER_FORMAT: load_classifier,
    GENERATOR_FORMAT: load_generator,
    KKT_FORMAT: load_kkt_candidates,
}


def load_module(path: str | Path, fmt: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint of format `fmt` (e.g. an AttackOutput's `checkpoint_format`) with its loader."""
    if fmt not in LOADERS:
        raise CheckpointError(f"no loader for checkpoint format {fmt!r}; known: {sorted(LOADERS)}")
    return LOADERS[fmt](path)
