"""Control classifiers whose leakage is known by construction: the yardstick for every verdict.

An audit that says LOW means little until the same attack and rule have been shown to say more on
a model that does leak, and LOW on one that cannot. Each control fixes a data set transformation
and classifier settings; the classifier is trained and cached like any other
(`classifier.load_or_train`), and its expected verdict is written here, before any run.

- leaky-fc: a fully connected ReLU network (784-1000-1000-10, no BatchNorm/dropout) trained
  full-batch with SGD + weight decay to zero training error on 10 images per class, for long: the
  setting in which stationarity (KKT) attacks recover training images (Haim et al. 2022,
  Buzaglo et al. 2023).
- stationary-fc: leaky-fc's network and data with a smooth activation (softplus, beta 10), trained the
  same way and then polished by full-batch L-BFGS (float64) until the stationarity residual
  ‖∇CE + wd·θ‖ / ‖wd·θ‖ is at most 1e-3 (or 5,000 iterations): the KKT attack's equation holds there,
  so this control measures what the attack does when its premise is met (no ReLU smoothing needed).
- margin-fc: leaky-fc's network and data in Haim et al.'s regime: first layer initialised at 1e-4 of
  PyTorch's default scale, full batch, no weight decay, trained until the normalised margin grows by
  less than 0.1 % over 1,000 epochs, at most 100,000 epochs (the CPU budget: ~1.1 GFLOP per epoch on
  MNIST, ~2.4 on CIFAR-10; about 1 h and 2-2.5 h of one core at the 28-47 GFLOP/s measured for the KKT
  step, an estimate, not a measurement). Gradient flow then converges in direction to a KKT point of
  the max-margin problem, the hard-margin form of the equation.
- leaky-cnn: the paper's CNN on 10 images per class, many epochs.
- canaries: the paper's CNN on T = 1,000, of which a few distinctive images (inverted, with a
  stamped square) are repeated `copies` times; the exposure of exactly those images is reported.
- clean: the default CNN on T = 1,000 (the demo's classifier).
- never-saw-t: the same architecture trained on H' instead of T. Scored against T, any "exposure"
  it shows is a false positive by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.data import DatasetBundle, Split


@dataclass(frozen=True)
class Control:
    name: str
    expected: str                 # the verdict written down before the run: "above LOW" or "LOW"
    why: str
    train_size: int               # |T| loaded from the data set (class-balanced)
    settings: ClassifierSettings
    canaries: int = 0             # distinctive images planted in T ...
    copies: int = 0               # ... each present this many times
    swap: bool = False            # train on H' instead of T (never saw T)

    @property
    def leaky(self) -> bool:
        return self.expected != "LOW"


CONTROLS: dict[str, Control] = {c.name: c for c in (
    Control("leaky-fc", "above LOW", "784-1000-1000-10 ReLU MLP, 10 images/class, full-batch SGD + weight decay, "
            "trained to zero error", 100,
            ClassifierSettings(arch="fc", hidden=1000, depth=2, epochs=8000, batch_size=100, lr=0.05,
                               optimizer="sgd", weight_decay=5e-3, dropout=0.0)),
    Control("stationary-fc", "above LOW", "leaky-fc with softplus (beta 10), then full-batch L-BFGS to a stationarity "
            "residual <= 1e-3: the KKT equation holds", 100,
            ClassifierSettings(arch="fc", hidden=1000, depth=2, epochs=8000, batch_size=100, lr=0.05,
                               optimizer="sgd", weight_decay=5e-3, dropout=0.0, activation="softplus",
                               softplus_beta=10.0, polish_steps=5000, polish_target=1e-3, polish_double=True)),
    Control("margin-fc", "above LOW", "leaky-fc's MLP, first layer at 1e-4 x its default init, full batch, no weight "
            "decay, until the normalised margin stops growing (<= 100k epochs)", 100,
            ClassifierSettings(arch="fc", hidden=1000, depth=2, epochs=100_000, batch_size=100, lr=0.05,
                               optimizer="sgd", weight_decay=0.0, dropout=0.0, init_scale=1e-4, init_layers="first",
                               margin_window=1000, margin_tol=1e-3)),
    Control("leaky-cnn", "above LOW", "the paper's CNN on 10 images/class, 300 epochs", 100,
            ClassifierSettings(arch="cnn", epochs=300, batch_size=20)),
    Control("canaries", "above LOW", "the paper's CNN on T = 1,000 with 5 inverted, stamped digits, each 10x in T",
            1000, ClassifierSettings(arch="cnn"), canaries=5, copies=10),
    Control("clean", "LOW", "the default CNN on T = 1,000 (the demo's classifier)", 1000, ClassifierSettings(arch="cnn")),
    Control("never-saw-t", "LOW", "the default CNN trained on H' (never saw T): exposure of T is a false positive",
            1000, ClassifierSettings(arch="cnn"), swap=True),
)}


def canary_image(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, H, W): inverted, with a bright square stamped in the top-left corner.

    Such an image is unlike any natural digit, so a reconstruction close to it can only come from
    the model having memorised it."""
    out = 1.0 - img
    s = max(2, img.shape[-1] // 5)
    out[:, 1:1 + s, 1:1 + s] = 0.0 if out[:, 1:1 + s, 1:1 + s].mean() > 0.5 else 1.0
    return out


def plant_canaries(train: Split, canaries: int, copies: int) -> tuple[Split, Split, torch.Tensor]:
    """Replace images of T by `canaries` canary images, each `copies` times, keeping |T| and the classes.

    Returns (T as trained on, T as scored: each canary once, the canaries' indices in the scored T).
    Canary i is made from the i-th image of T; its copies replace later images of the same class.
    """
    if canaries < 1 or copies < 1:
        raise ValueError("canaries and copies must be >= 1")
    images, labels = train.images.clone(), train.labels.clone()
    drop: list[int] = []
    for i in range(canaries):
        images[i] = canary_image(train.images[i])
        same = [j for j in range(canaries, len(labels)) if labels[j] == labels[i] and j not in drop]
        if len(same) < copies - 1:
            raise ValueError(f"class {int(labels[i])} has too few images for {copies} copies")
        for j in same[-(copies - 1):] if copies > 1 else []:
            images[j] = images[i]
            drop.append(j)
    keep = torch.tensor([j for j in range(len(labels)) if j not in set(drop)])
    return Split(images, labels), Split(images[keep], labels[keep]), torch.arange(canaries)


def control_bundles(control: Control, bundle: DatasetBundle) -> tuple[DatasetBundle, DatasetBundle, torch.Tensor]:
    """(bundle the classifier is trained on, bundle the attack is scored against, canary indices in the latter).

    The scored bundle's T is always the images the audit asks about; for `never-saw-t` the model was
    trained on H' and T is scored as if it were the training set.
    """
    if control.swap:
        return replace(bundle, train=bundle.heldout, heldout=bundle.train), bundle, torch.empty(0, dtype=torch.long)
    if control.canaries:
        trained, scored, idx = plant_canaries(bundle.train, control.canaries, control.copies)
        return replace(bundle, train=trained), replace(bundle, train=scored), idx
    return bundle, bundle, torch.empty(0, dtype=torch.long)
