"""The classifiers under audit and the conditioned generator (docs/method.md §1-2).

Classifiers are `trunk` (convolutions; just a flatten for MLPs) -> `fc` -> `out`. They expose
`features(x)` (the input of the last fully connected layer, used by the Cos/Ortho diversity terms)
and `head(features)` (the logits), so one forward pass serves both.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tldr_core.attack.config import ConfigError

LEAK = 0.2


class HeadOnly(nn.Module):
    """A view of a classifier's fully connected part (`fc` then `out`), sharing its modules.

    Its parameter names equal the classifier's ("fc.0.weight", "out.bias"), so the same parameter
    dict drives both under torch.func.functional_call.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.fc, self.out = classifier.fc, classifier.out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(h))


class PaperCNN(nn.Module):
    """The paper's classifier: conv-BN-LeakyReLU blocks with dropout, then fully connected layers.

    Works for any input (C, H, W) with H, W >= 4: two 2x2 poolings, then an adaptive pool keeps
    the fully connected part small for large images.
    """

    arch = "cnn"
    MIN_SIDE = 4  # as model_specs checks it

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.25,
                 width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        c, h, w = in_shape
        if min(h, w) < self.MIN_SIDE:  # two 2x2 poolings; a 1x1 input fails inside BatchNorm
            raise ConfigError(f"the cnn classifier needs images of at least {self.MIN_SIDE}x{self.MIN_SIDE}, got "
                              f"{h}x{w}: resize them (--image-size) or use --arch mlp")
        self.in_shape, self.num_classes, self.dropout, self.width, self.hidden = tuple(in_shape), num_classes, dropout, width, hidden

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(LEAK)]

        layers = [*block(c, width), *block(width, width)]
        if min(h, w) >= 8:  # tiny inputs (8x8 digits) keep their resolution for the second block
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Dropout(dropout), *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
                   nn.Dropout(dropout)]
        conv = nn.Sequential(*layers)
        with torch.no_grad():
            fh, fw = conv(torch.zeros(1, c, h, w)).shape[-2:]
        # Cap the flattened size so 64x64 face images do not produce a huge first FC layer.
        pool = (min(fh, 8), min(fw, 8))
        self.trunk = nn.Sequential(conv, nn.AdaptiveAvgPool2d(pool), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(2 * width * pool[0] * pool[1], hidden), nn.LeakyReLU(LEAK), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, hidden): the last fully connected layer's input."""
        return self.fc(self.trunk(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def spec(self) -> dict[str, Any]:
        return {"arch": self.arch, "in_shape": list(self.in_shape), "num_classes": self.num_classes,
                "dropout": self.dropout, "width": self.width, "hidden": self.hidden}


class MLP(nn.Module):
    """A fully connected classifier: its first layer's weight rows are the weight-template attack's input."""

    arch = "mlp"

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0,
                 hidden: int = 0) -> None:
        super().__init__()
        self.in_shape, self.num_classes, self.dropout, self.hidden = tuple(in_shape), num_classes, dropout, hidden
        d = math.prod(in_shape)
        self.trunk = nn.Flatten()
        if hidden:
            self.fc = nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(LEAK), nn.Dropout(dropout))
            self.out = nn.Linear(hidden, num_classes)
        else:  # linear model: features are the flattened input, the head is the only layer
            self.fc = nn.Sequential(nn.Dropout(dropout))
            self.out = nn.Linear(d, num_classes)

    def first_layer(self) -> nn.Linear:
        """The fully connected layer that sees the pixels (the weight-template attack reads it)."""
        return self.fc[0] if self.hidden else self.out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def spec(self) -> dict[str, Any]:
        return {"arch": self.arch, "in_shape": list(self.in_shape), "num_classes": self.num_classes,
                "dropout": self.dropout, "hidden": self.hidden}


#: The FC classifier's activations: ReLU (the stationarity attacks' setting) or a smooth one, for which
#: the stationarity equation can hold exactly (L-BFGS reaches stationary points of smooth objectives).
ACTIVATIONS = ("relu", "softplus", "silu", "gelu")
#: Which layers `init_scale` scales.
INIT_LAYERS = ("all", "first")


def activation_module(name: str, beta: float = 10.0) -> nn.Module:
    """nn.ReLU, nn.Softplus(beta), nn.SiLU or nn.GELU (exact, erf-based) by name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
    if name == "softplus":
        return nn.Softplus(beta=beta)
    return {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[name]()


class FC(nn.Module):
    """A plain fully connected network (e.g. 784-1000-1000-10): no BatchNorm, no dropout.

    The setting in which stationarity (KKT) reconstruction attacks recover training images: trained
    to zero error on a few images, its weights are close to a weighted sum of per-sample gradients.
    ReLU (the default, not LeakyReLU) keeps the network positively homogeneous, as that analysis
    assumes; a smooth activation (softplus with sharpness `beta`, SiLU, GELU) makes the training
    objective smooth, so it can be driven to an exact stationary point. `init_scale` multiplies
    PyTorch's default initialisation (weights and biases; 1 = unchanged) of every layer, or with
    `init_layers="first"` of the first layer only (Haim et al.'s small initialisation: scaling every
    layer of a deep network by 1e-2 or less leaves it untrained for thousands of epochs).
    """

    arch = "fc"

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, ...] = (1000, 1000),
                 activation: str = "relu", beta: float = 10.0, init_scale: float = 1.0,
                 init_layers: str = "all") -> None:
        super().__init__()
        if not widths:
            raise ValueError("an fc classifier needs at least one hidden layer")
        if not (math.isfinite(beta) and beta > 0 and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"fc: beta and init_scale must be finite and > 0, got {beta!r}, {init_scale!r}")
        if init_layers not in INIT_LAYERS:
            raise ValueError(f"fc: init_layers must be one of {INIT_LAYERS}, got {init_layers!r}")
        self.in_shape, self.num_classes, self.widths = tuple(in_shape), num_classes, tuple(int(w) for w in widths)
        self.activation, self.beta, self.init_scale = activation, float(beta), float(init_scale)
        self.init_layers = init_layers
        self.trunk = nn.Flatten()
        layers: list[nn.Module] = []
        d = math.prod(in_shape)
        for w in self.widths:
            layers += [nn.Linear(d, w), activation_module(activation, beta)]
            d = w
        self.fc = nn.Sequential(*layers)
        self.out = nn.Linear(d, num_classes)
        if init_scale != 1.0:
            with torch.no_grad():
                for p in (self.parameters() if init_layers == "all" else self.fc[0].parameters()):
                    p.mul_(init_scale)

    def first_layer(self) -> nn.Linear:
        return self.fc[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def spec(self) -> dict[str, Any]:
        """The rebuild recipe; the options added later appear only when they differ from their default,
        so a ReLU network's spec (and every file written before them) is unchanged."""
        out: dict[str, Any] = {"arch": self.arch, "in_shape": list(self.in_shape), "num_classes": self.num_classes,
                               "widths": list(self.widths)}
        if self.activation != "relu":
            out["activation"] = self.activation
        if self.activation == "softplus":
            out["beta"] = self.beta
        if self.init_scale != 1.0:
            out["init_scale"] = self.init_scale
        if self.init_layers != "all":
            out["init_layers"] = self.init_layers
        return out


ARCHS = {"cnn": PaperCNN, "mlp": MLP, "fc": FC}


def build_classifier(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a classifier from its `spec()` dict (as stored in checkpoints)."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"unknown classifier architecture {arch!r}; known: {sorted(ARCHS)}")
    spec["in_shape"] = tuple(spec["in_shape"])
    return ARCHS[arch](**spec)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------

def hot_matrix(labels: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) int -> (B, 1, n, n): row k and column k all ones, the rest zeros (docs/method.md §2)."""
    eye = F.one_hot(labels, n).to(torch.float32)          # (B, n)
    return torch.clamp(eye[:, :, None] + eye[:, None, :], max=1.0)[:, None]


def sample_conditioning(batch: int, num_classes: int, mode: str, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning vectors and their encoded labels.

    inversion: v = softmax(u), u ~ N(0, I): the label argmax(v) is never shown directly.
    reconstruction: hot (one-hot) vectors, pushing towards confidently classified samples.
    Returns (v (B, N) float, labels (B,) int64 = argmax(v)).
    """
    at = generator.device if generator is not None else "cpu"  # draw where the generator lives
    if mode == "inversion":
        u = torch.randn(batch, num_classes, generator=generator, device=at)
        v = torch.softmax(u, dim=1)
        labels = v.argmax(dim=1)
    else:
        labels = torch.randint(0, num_classes, (batch,), generator=generator, device=at)
        v = F.one_hot(labels, num_classes).to(torch.float32)
    return v.to(device), labels.to(device)


def balanced_conditioning(per_class: int, num_classes: int, device: torch.device | str = "cpu"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hot conditioning with exactly `per_class` samples of each class, in class order."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return F.one_hot(labels, num_classes).to(torch.float32).to(device), labels.to(device)


class ConditionedGenerator(nn.Module):
    """z (+ conditioning) -> image, by transposed convolutions with batch norm and dropout.

    The feature map passes through exactly N x N (N = number of classes) so the matrix variants can
    concatenate the hot N x N matrix there as an extra channel; after that it is upsampled by stride-2
    transposed convolutions and finally resized to the image size.
    """

    def __init__(self, variant: str, num_classes: int, image_shape: tuple[int, int, int],
                 latent_dim: int = 64, dropout: float = 0.3, width: int = 64) -> None:
        super().__init__()
        from tldr_core.attack.config import VARIANTS
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        self.variant, self.num_classes, self.image_shape = variant, num_classes, tuple(image_shape)
        self.latent_dim, self.width, self.dropout = latent_dim, width, dropout
        n = max(num_classes, 4)
        self.n = n
        c, h, w = image_shape
        uses_vector = variant in ("vector", "vector-matrix")
        self.uses_matrix = variant in ("matrix", "vector-matrix")
        if variant == "label":
            self.embed = nn.Embedding(num_classes, num_classes)
        in_dim = latent_dim + (num_classes if variant == "label" or uses_vector else 0)
        self.start = math.ceil(n / 2)
        self.fc = nn.Sequential(nn.Linear(in_dim, width * self.start ** 2), nn.BatchNorm1d(width * self.start ** 2),
                                nn.LeakyReLU(LEAK))
        self.to_nn = nn.Sequential(nn.ConvTranspose2d(width, width, 4, 2, 1), nn.BatchNorm2d(width),
                                   nn.LeakyReLU(LEAK), nn.Dropout2d(dropout))
        ups: list[nn.Module] = []
        ch = width + (1 if self.uses_matrix else 0)
        size = n
        while size * 2 <= max(h, w):  # double while it fits, then one resize to the image size
            nxt = max(ch // 2, 32)
            ups += [nn.ConvTranspose2d(ch, nxt, 4, 2, 1), nn.BatchNorm2d(nxt), nn.LeakyReLU(LEAK), nn.Dropout2d(dropout)]
            ch, size = nxt, size * 2
        self.up = nn.Sequential(*ups)
        # A refining convolution at the image's own resolution, after the resize.
        self.refine = nn.Sequential(nn.Conv2d(ch, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(LEAK))
        self.to_img = nn.Conv2d(32, c, 3, padding=1)

    def forward(self, z: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z (B, latent), v (B, N) conditioning vector, labels (B,) -> images (B, C, H, W).

        Images are unbounded (the Pix loss keeps them in [0, 1]); callers clamp for display/scoring.
        """
        if self.variant == "label":
            x = torch.cat([z, self.embed(labels)], dim=1)
        elif self.variant in ("vector", "vector-matrix"):
            x = torch.cat([z, v], dim=1)
        else:  # matrix: unconditioned until N x N
            x = z
        x = self.fc(x).view(-1, self.width, self.start, self.start)
        x = self.to_nn(x)
        if x.shape[-1] != self.n:
            x = F.interpolate(x, size=(self.n, self.n), mode="bilinear", align_corners=False)
        if self.uses_matrix:
            x = torch.cat([x, hot_matrix(labels, self.n)], dim=1)
        x = self.up(x)
        h, w = self.image_shape[1:]
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = self.refine(x)
        # Offset so an untrained generator starts near mid-grey rather than at the [0,1] border.
        return self.to_img(x) + 0.5

    def spec(self) -> dict[str, Any]:
        return {"variant": self.variant, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "latent_dim": self.latent_dim, "dropout": self.dropout, "width": self.width}
