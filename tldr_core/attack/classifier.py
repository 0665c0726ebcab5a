"""Training the classifier under audit, once, and caching it by everything that determines it."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tldr_core.paths import cache_dir
from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, CheckpointError, load_classifier, save_checkpoint
from tldr_core.attack.models import ARCHS, build_classifier


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

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown classifier architecture {self.arch!r}; known: {sorted(ARCHS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid classifier settings: {self}")


def default_cache_dir() -> Path:
    return cache_dir() / "classifiers"


def _key_settings(settings: ClassifierSettings) -> dict[str, Any]:
    d = asdict(settings)
    if settings.arch != "fc":  # `depth` came later; leaving it out keeps older cache entries valid
        d.pop("depth")
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
    else:
        spec.update(dropout=settings.dropout, hidden=settings.hidden)
    return build_classifier(spec)


def train_classifier(bundle, settings: ClassifierSettings, device: str = "cpu",
                     log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """Plain supervised training on `bundle.train`; returns the frozen eval-mode model and its meta."""
    torch.manual_seed(settings.seed)
    model = build_for(bundle, settings).to(device)
    params = model.parameters()
    opt = (torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay) if settings.optimizer == "adam"
           else torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay))
    x, y = bundle.train.images, bundle.train.labels
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.time()
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if epoch == settings.epochs - 1 or epoch % max(5, settings.epochs // 20) == 0:
            log(f"  classifier epoch {epoch + 1}/{settings.epochs}  loss {total / len(x):.4f}  ({time.time() - t0:.0f}s)")
    model.eval().requires_grad_(False)
    meta = {"dataset": bundle.name, "train_size": len(bundle.train), "settings": asdict(settings),
            "train_accuracy": accuracy(model, x, y), "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels),
            "test_size": len(bundle.test), "train_seconds": round(time.time() - t0, 2)}
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
