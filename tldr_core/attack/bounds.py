"""How much memory an input may ask for, checked before anything of that size is allocated.

A flag or a small file can ask for more memory than a machine has: an image size, a number of KKT
candidates. These bounds say what an audit accepts; docs/security.md ("Bounds") gives each number's
reason. The model-file bounds are in ``model_specs.LIMITS``, the image-file ones in ``images.py``
and ``npz_data.py``.
"""
from __future__ import annotations

import math

from tldr_core.attack.config import ConfigError
from tldr_core.attack.model_specs import LIMITS

#: Largest image side an audit trains and attacks at. The default CNN's forward pass keeps ~82 MB of
#: activations per 256x256 RGB image and the generator's ~43 MB (layer outputs counted on the meta
#: device), so one TLDR step at batch 64 (generator, classifier, their backward passes) needs an
#: estimated 16-20 GB: one large GPU. At 512 it is 4x that.
MAX_SIDE = 256
#: KKT candidates per class, at most this multiple of the training images per class (the attacker's
#: assumed knowledge; the literature and our default use 2x).
KKT_PER_CLASS_FACTOR = 10
#: KKT candidates' pixel values in all: the candidates, their gradient and Adam's two moments are
#: 4 float32 copies of them, 4 GiB at this bound (a CIFAR-10 audit of T = 25,000 at the default 2x: 1.5e8).
MAX_KKT_VALUES = 1 << 28
#: KKT candidates per class, whatever the data: the largest count a candidates file may hold.
MAX_KKT_COUNT = LIMITS["count"]


def check_kkt_candidates(per_class: int, train_per_class: int, num_classes: int,
                         image_shape: tuple[int, int, int]) -> None:
    """ConfigError unless ``per_class`` candidates per class stay within both KKT bounds above."""
    most = KKT_PER_CLASS_FACTOR * train_per_class
    if per_class > most:
        raise ConfigError(f"kkt: {per_class:,} candidates per class is more than {KKT_PER_CLASS_FACTOR} x the "
                          f"{train_per_class:,} training images per class ({most:,}); more candidates than that "
                          "only share the same weights among more, smaller coefficients")
    values = per_class * num_classes * math.prod(image_shape)
    if values > MAX_KKT_VALUES:
        fits = max(1, MAX_KKT_VALUES // (num_classes * math.prod(image_shape)))
        raise ConfigError(f"kkt: {per_class:,} candidates per class of {num_classes} classes of shape "
                          f"{tuple(image_shape)} are {values:,} values, more than the {MAX_KKT_VALUES:,} "
                          f"(4 GiB with their gradient and optimiser state) allowed; at most {fits:,} per class")
