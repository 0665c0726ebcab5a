"""Training the classifier under audit, once, and caching it by everything that determines it."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tldr_core.paths import cache_dir
from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, CheckpointError, load_classifier, save_checkpoint
from tldr_core.attack.full_batch import lbfgs_polish, normalised_margin, wd_residual
from tldr_core.attack.models import ACTIVATIONS, ARCHS, INIT_LAYERS, build_classifier


@dataclass(frozen=True)
class ClassifierSettings:
    """Training choices of the audited classifier (the defence comparison varies these)."""

    arch: str = "cnn"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"      # adam | sgd
    weight_decay: float = 0.0
    dropout: float = 0.25
    hidden: int = 128
    seed: int = 0
    depth: int = 2               # hidden layers of the "fc" architecture only
    # Added later; each enters the cache key only when it differs from its default (see `_key_settings`).
    activation: str = "relu"     # fc only: relu | softplus | silu | gelu
    softplus_beta: float = 10.0  # fc with activation softplus: its sharpness
    init_scale: float = 1.0      # fc only: multiplies the default initialisation of ...
    init_layers: str = "all"     # ... every layer (all) or of the first layer only (first)
    polish_steps: int = 0        # full-batch L-BFGS iterations after the epochs (needs weight decay) ...
    polish_target: float = 1e-3  # ... stopping once the stationarity residual is this small ...
    polish_double: bool = True   # ... iterating in float64
    margin_window: int = 0       # no weight decay: stop once the normalised margin grew by less than
    margin_tol: float = 1e-3     # margin_tol (relative) over margin_window epochs; 0 = train all epochs
    max_seconds: float = 0.0     # stop the epochs after this long; 0 = no limit (> 0: machine-dependent)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown classifier architecture {self.arch!r}; known: {sorted(ARCHS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid classifier settings: {self}")
        self._check_added()

    def _check_added(self) -> None:
        """The later options: valid values, and only where they mean something."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.init_layers not in INIT_LAYERS:
            raise ValueError(f"unknown init_layers {self.init_layers!r}; choose one of {INIT_LAYERS}")
        if self.arch != "fc" and (self.activation != "relu" or self.init_scale != 1.0 or self.init_layers != "all"):
            raise ValueError(f"activation and init_scale are options of the fc architecture, not {self.arch!r}")
        if not (self.softplus_beta > 0 and self.init_scale > 0 and self.polish_target > 0 and self.margin_tol >= 0
                and self.max_seconds >= 0 and self.polish_steps >= 0 and self.margin_window >= 0):
            raise ValueError(f"invalid classifier settings: {self}")
        if self.polish_steps and not self.weight_decay > 0:
            raise ValueError("polish_steps needs weight_decay > 0: without it the objective has no stationary point")
        if self.margin_window and self.weight_decay:
            raise ValueError("margin_window is the stop for training without weight decay (weight_decay = 0)")


def default_cache_dir() -> Path:
    return cache_dir() / "classifiers"


#: Fields added after the cache existed: in the key only when they differ from these defaults.
_ADDED = {f.name: f.default for f in fields(ClassifierSettings)
          if f.name in ("activation", "softplus_beta", "init_scale", "init_layers", "polish_steps", "polish_target",
                        "polish_double", "margin_window", "margin_tol", "max_seconds")}


def _key_settings(settings: ClassifierSettings) -> dict[str, Any]:
    d = asdict(settings)
    if settings.arch != "fc":  # `depth` came later; leaving it out keeps older cache entries valid
        d.pop("depth")
    for name, default in _ADDED.items():  # likewise: a default-valued later option leaves the key as it was
        if d[name] == default:
            d.pop(name)
    return d


def cache_key(bundle, settings: ClassifierSettings) -> str:
    ident = {"dataset": bundle.name, "source": bundle.source, "train_size": len(bundle.train),
             "image_shape": list(bundle.image_shape), "num_classes": bundle.num_classes,
             # the exact subset matters, not only its size: hash the labels and a pixel checksum
             "train_digest": hashlib.sha256(bundle.train.images.numpy().tobytes()
                                            + bundle.train.labels.numpy().tobytes()).hexdigest()[:16],
             "settings": _key_settings(settings), "format": CLASSIFIER_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(bundle, settings: ClassifierSettings, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`load_or_train` keeps the classifier of (data, subset, settings), trained or not."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return folder / f"{bundle.name}-{len(bundle.train)}-{settings.arch}-{cache_key(bundle, settings)}.pt"


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    dev = next(model.parameters()).device
    correct = sum((model(images[i:i + batch].to(dev)).argmax(1).cpu() == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / max(len(images), 1)


def build_for(bundle, settings: ClassifierSettings) -> nn.Module:
    spec: dict[str, Any] = {"arch": settings.arch, "in_shape": list(bundle.image_shape), "num_classes": bundle.num_classes}
    if settings.arch == "fc":  # `depth` layers of width `hidden`, no dropout (see models.FC)
        spec["widths"] = [settings.hidden] * settings.depth
        if settings.activation != "relu":  # the later options only when set, as FC.spec() writes them
            spec["activation"] = settings.activation
        if settings.activation == "softplus":
            spec["beta"] = settings.softplus_beta
        if settings.init_scale != 1.0:
            spec["init_scale"] = settings.init_scale
        if settings.init_layers != "all":
            spec["init_layers"] = settings.init_layers
    else:
        spec.update(dropout=settings.dropout, hidden=settings.hidden)
    return build_classifier(spec)


def _optimizer(model: nn.Module, settings: ClassifierSettings) -> torch.optim.Optimizer:
    params = model.parameters()
    return (torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
            if settings.optimizer == "adam"
            else torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay))


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
           batch_size: int, device: str) -> float:
    """One pass over T in the order given; returns the mean training loss."""
    model.train()
    total = 0.0
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(x)


def _margin_stalled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ClassifierSettings,
                    info: dict[str, Any]) -> bool:
    """Record the margins in `info`; True once T is separated and the normalised margin grew by less than
    margin_tol (relative) since the previous check."""
    lowest, normalised = normalised_margin(model, x, y)
    before = info.get("normalised_margin")
    info.update(min_margin=lowest, normalised_margin=normalised)
    return lowest > 0 and before is not None and normalised - before <= settings.margin_tol * abs(before)


def _first_order(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ClassifierSettings, device: str,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The epochs of Adam / SGD; returns {"train_epochs", "train_stop" (epochs | margin | time), ...}."""
    opt = _optimizer(model, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    t0, every = time.time(), max(5, settings.epochs // 20)
    info: dict[str, Any] = {"train_epochs": settings.epochs, "train_stop": "epochs"}
    for epoch in range(settings.epochs):
        loss = _epoch(model, opt, x, y, torch.randperm(len(x), generator=gen), settings.batch_size, device)
        if epoch == settings.epochs - 1 or epoch % every == 0:
            log(f"  classifier epoch {epoch + 1}/{settings.epochs}  loss {loss:.4f}  ({time.time() - t0:.0f}s)")
        stop = None
        if settings.margin_window and (epoch + 1) % settings.margin_window == 0 and \
                _margin_stalled(model, x, y, settings, info):
            stop = "margin"
        elif settings.max_seconds and time.time() - t0 > settings.max_seconds:
            stop = "time"
        if stop:
            log(f"  classifier: stopped after epoch {epoch + 1} ({stop}), loss {loss:.4g}")
            info.update(train_epochs=epoch + 1, train_stop=stop)
            break
    return info


def train_classifier(bundle, settings: ClassifierSettings, device: str = "cpu",
                     log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """Supervised training on `bundle.train`: the epochs, then (polish_steps) full-batch L-BFGS towards a
    stationary point. Returns the frozen eval-mode model and its meta: accuracies, the training cost
    (train_seconds, train_epochs, train_stop, polish_steps, polish_seconds) and, with weight decay, the
    stationarity residual ‖∇CE + wd·θ‖ / ‖wd·θ‖ of the final weights (`full_batch.wd_residual`)."""
    torch.manual_seed(settings.seed)
    model = build_for(bundle, settings).to(device)
    x, y = bundle.train.images, bundle.train.labels
    t0 = time.time()
    info = _first_order(model, x, y, settings, device, log)
    model.eval().requires_grad_(False)
    if settings.polish_steps:
        info.update(lbfgs_polish(model, x, y, settings.weight_decay, steps=settings.polish_steps,
                                 target=settings.polish_target, double=settings.polish_double, log=log))
    if settings.weight_decay > 0:
        info["stationarity_residual"] = info.get("polish_residual") or wd_residual(model, x, y, settings.weight_decay)
    if settings.margin_window:
        info["min_margin"], info["normalised_margin"] = normalised_margin(model, x, y)
    meta = {"dataset": bundle.name, "train_size": len(bundle.train), "settings": asdict(settings),
            "train_accuracy": accuracy(model, x, y), "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels),
            "test_size": len(bundle.test), "train_seconds": round(time.time() - t0, 2), **info}
    return model.cpu(), meta


def load_or_train(bundle, settings: ClassifierSettings, *, cache_dir: str | Path | None = None, device: str = "cpu",
                  log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any], Path]:
    """The cached classifier for (data, subset, settings), training it on first use. Returns (model, meta, path)."""
    path = cache_path(bundle, settings, cache_dir)
    if path.exists():
        try:
            model, meta = load_classifier(path)
            log(f"classifier: reusing {path} (test accuracy {meta['test_accuracy']:.3f})")
            return model, meta, path
        except CheckpointError as exc:  # a damaged cache entry is retrained, never trusted
            log(f"classifier: cached file unusable ({exc}); retraining")
    log(f"classifier: training {settings.arch} on {len(bundle.train)} {bundle.name} images ({settings.epochs} epochs)")
    model, meta = train_classifier(bundle, settings, device=device, log=log)
    meta["cache_key"] = path.stem
    save_checkpoint(path, model, CLASSIFIER_FORMAT, meta)
    log(f"classifier: test accuracy {meta['test_accuracy']:.3f} on {meta['test_size']} held-out images; saved {path}")
    return model, meta, path
