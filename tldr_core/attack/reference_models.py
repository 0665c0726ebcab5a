"""Reference models for offline LiRA: classifiers of the audited model's architecture and training
settings, trained on subsets of the population set P = ``bundle.test`` only (docs/method.md §10).

P is disjoint from T and H', so every image whose membership is scored is OUT for every reference.
Reference k trains on a class-balanced subset of P drawn with seed k: per class c, ``|T_c|``
images when P holds at least ``2 |T|`` images (LiRA's references mimic the target's training-set
size), capped at half of ``P_c`` so that the references' subsets differ; else a random half of
``P_c``. The rest of P is its test set (the test accuracy in its meta).

Each reference is an ordinary cached classifier (:func:`tldr_core.attack.classifier.load_or_train`,
keyed by its data digest and settings), so a second audit of the same data and settings reuses it.
Its training seed is the target's plus ``k + 1``: the references' spread must hold the training
randomness (initialisation, batch order) that the target's own margins carry, the more so when
the target's seed is unknown. Never imports Ray: the platform layer runs these as Ray tasks.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tldr_core.attack.classifier import ClassifierSettings, cache_path, load_or_train
from tldr_core.attack.data import DatasetBundle

__all__ = ["reference_indices", "reference_bundle", "reference_settings", "reference_cache_path",
           "load_or_train_reference", "settings_from_meta"]


def reference_indices(train_labels: torch.Tensor, population_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices into P of reference ``k``'s training images (module doc for the sizes)."""
    if k < 0:
        raise ValueError(f"reference index k must be >= 0, got {k}")
    t_lab, p_lab = torch.as_tensor(train_labels).long(), torch.as_tensor(population_labels).long()
    full = p_lab.numel() >= 2 * t_lab.numel()
    g = torch.Generator().manual_seed(k)
    picks = []
    for c in torch.unique(p_lab).tolist():
        ix = (p_lab == c).nonzero(as_tuple=True)[0]
        n = min(int((t_lab == c).sum()), ix.numel() // 2) if full else ix.numel() // 2
        picks.append(ix[torch.randperm(ix.numel(), generator=g)[:n]])
    idx = torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.int64)
    if idx.numel() < 2:
        raise ValueError(f"the population set P (the test set, {p_lab.numel()} images) is too small to train "
                         f"reference models on; audit with a smaller training set, or without reference models "
                         f"(loss and margin attacks only)")
    return idx


def reference_bundle(bundle: DatasetBundle, k: int) -> DatasetBundle:
    """The bundle reference ``k`` is trained on: train = its subset of P, heldout = test = the rest of P.

    T and H' are not in it at all (only ``bundle.test`` is read)."""
    pop = bundle.test
    idx = reference_indices(bundle.train.labels, pop.labels, k)
    rest = torch.ones(len(pop), dtype=torch.bool)
    rest[idx] = False
    other = pop.subset(rest)
    return DatasetBundle(name=f"{bundle.name}-ref{k}", train=pop.subset(idx), heldout=other, test=other,
                         num_classes=bundle.num_classes, image_shape=bundle.image_shape,
                         class_names=list(bundle.class_names),
                         source=f"{bundle.source}; reference {k}: {idx.numel()} of the {len(pop)} population images")


def reference_settings(settings: ClassifierSettings, k: int) -> ClassifierSettings:
    """The target's settings with the training seed ``settings.seed + k + 1`` (module doc)."""
    return replace(settings, seed=settings.seed + k + 1)


def reference_cache_path(bundle: DatasetBundle, settings: ClassifierSettings, k: int,
                         cache_dir: str | Path | None = None) -> Path:
    """Where reference ``k`` of (bundle, target settings) is cached, whether trained yet or not."""
    return cache_path(reference_bundle(bundle, k), reference_settings(settings, k), cache_dir)


def load_or_train_reference(bundle: DatasetBundle, settings: ClassifierSettings, k: int, *,
                            cache_dir: str | Path | None = None, device: str = "cpu",
                            log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any], Path]:
    """Reference ``k`` for the audit of a classifier trained on ``bundle.train`` with ``settings``:
    (model, meta, cache path), trained on first use and cached like any classifier."""
    return load_or_train(reference_bundle(bundle, k), reference_settings(settings, k), cache_dir=cache_dir,
                         device=device, log=log)


_DEFAULTS = {f.name: f.default for f in fields(ClassifierSettings)}
#: Every classifier's training has these; other fields are options whose default means "off".
_CORE = ("arch", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "dropout", "hidden", "seed", "depth")


def _cast(key: str, value: Any) -> Any:
    """``value`` as the type of the field's default (an int field refuses 2.5, a bool field "yes")."""
    kind = type(_DEFAULTS[key])
    ok = (isinstance(value, bool) or value in (0, 1)) if kind is bool else not isinstance(value, bool)
    try:
        out = kind(value) if ok else None
        if kind is int and isinstance(value, float) and value != out:
            out = None
    except (TypeError, ValueError):
        out = None
    if out is None:
        raise ValueError(f"classifier setting {key}={value!r} is not a {kind.__name__}")
    return out


def _from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ClassifierSettings fields a model's spec() fixes (architecture only, never training)."""
    arch = spec.get("arch")
    if arch == "fc":
        widths = [int(w) for w in spec.get("widths", [])]
        if not widths or len(set(widths)) != 1:
            raise ValueError(f"fc widths {widths} cannot be rebuilt from settings (one width, `depth` times)")
        return {"arch": "fc", "hidden": widths[0], "depth": len(widths)}
    if arch == "cnn" and int(spec.get("width", 32)) != 32:
        raise ValueError(f"a cnn of width {spec['width']} cannot be rebuilt from settings (they train width 32)")
    return {k: spec[k] for k in ("arch", "dropout", "hidden") if k in spec}


def settings_from_meta(meta: Mapping[str, Any], spec: Mapping[str, Any] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> tuple[ClassifierSettings, list[str]]:
    """The audited classifier's ClassifierSettings, from its checkpoint: (settings, unknown fields).

    Sources, later ones winning: the defaults, ``meta["settings"]`` (what tldr records when it
    trains a classifier), the model's ``spec`` (its architecture as built), ``overrides`` (e.g.
    command-line flags for the fields the checkpoint does not record). ``unknown`` lists the
    training fields every classifier has (``arch`` ... ``depth``) that no source gave and the
    architecture uses (``depth`` only for fc, ``dropout`` not for fc): they hold the defaults, and
    the caller should say so or ask for flags. Fields added later as options whose default means
    "off" take the default silently when absent. Unrecognised keys are ignored.

    Raises:
        ValueError: a value of the wrong type or out of range, or a spec the settings cannot rebuild.
    """
    got: dict[str, Any] = {}
    recorded = meta.get("settings") if isinstance(meta, Mapping) else None
    for source in (recorded if isinstance(recorded, Mapping) else {}, _from_spec(spec or {}), overrides or {}):
        got.update({key: _cast(key, value) for key, value in source.items() if key in _DEFAULTS and value is not None})
    settings = ClassifierSettings(**got)
    unused = "dropout" if settings.arch == "fc" else "depth"  # the other architecture's field (build_for)
    return settings, [f for f in _CORE if f not in got and f != unused]
