"""The files every scored attack leaves behind, written the same way by the audit, the search trial
and the bench: reconstructions.npz, grid.png, nearest.png, exposure.csv and exposure.png (when the
attack was scored for exposure) and the attack's checkpoint (generator.pt for the TLDR generator,
``<kind>.pt`` for other attacks that train something).

Pairs with :mod:`tldr_core.scoring.pipeline`, which produces the :class:`Scored` written here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tldr_core.attack.checkpoints import save_checkpoint
from tldr_core.report.pictures import save_exposure_gallery, save_grid, save_nearest
from tldr_core.scoring.pipeline import Scored

#: Checkpoint file name per attack kind (others: "<kind>.pt").
CHECKPOINT_NAMES = {"tldr": "generator.pt"}
#: write_artifacts' keys -> file names (the checkpoint's depends on the kind).
ARTIFACT_FILES = {"reconstructions": "reconstructions.npz", "grid": "grid.png", "nearest": "nearest.png"}
#: The same for the exposure files, written when the scored attack has them (Scored.exposure / .gallery).
EXPOSURE_FILES = {"exposure": "exposure.csv", "exposure_gallery": "exposure.png"}


def checkpoint_name(kind: str) -> str:
    return CHECKPOINT_NAMES.get(kind, f"{kind}.pt")


def grid_title(bundle: Any, scored: Scored, prefix: str | None = None) -> str:
    """"<data set>: <variant> generator, quality 0.412, label agreement 0.97" (the audit's grid title);
    ``prefix`` replaces the part before "quality"."""
    m = scored.metrics
    if prefix is None:
        settings = scored.out.settings if scored.out is not None else {}
        what = (f"{settings.get('variant', 'conditioned')} generator" if scored.kind == "tldr"
                else f"{scored.kind} attack")
        prefix = f"{bundle.name}: {what}"
    return f"{prefix}, quality {m['quality']:.3f}, label agreement {m['label_agreement']:.2f}"


def write_artifacts(folder: str | Path, bundle: Any, scored: Scored, *, title: str | None = None,
                    meta: dict[str, Any] | None = None, checkpoint: bool = True) -> dict[str, Path]:
    """Write the scored attack's files into ``folder`` (created if missing).

    bundle: the DatasetBundle scored against (``.name``, ``.class_names``, ``.train.images``);
    title: grid.png's title (default :func:`grid_title`); meta: extra checkpoint metadata, after
    ``{"attack": settings, "dataset": bundle.name}``. The checkpoint is written only when the
    attack trained a module (``scored.out.module``, moved to the CPU) and ``checkpoint`` is true.

    Returns {"reconstructions", "grid", "nearest"[, "exposure"][, "exposure_gallery"][, "checkpoint"]: path}:
    exposure.csv (ExposureResult.write_csv: one row per training image) when ``scored.exposure`` is set,
    exposure.png (the gallery) when ``scored.gallery`` is.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / name for k, name in ARTIFACT_FILES.items()}
    np.savez_compressed(paths["reconstructions"], images=scored.images.numpy().astype(np.float32),
                        labels=scored.labels.numpy().astype(np.int64))
    save_grid(paths["grid"], scored.images, scored.labels, bundle.class_names,
              title=title if title is not None else grid_title(bundle, scored))
    save_nearest(paths["nearest"], scored.images, scored.labels, bundle.train.images[scored.nearest_index],
                 scored.nearest_ssim, bundle.class_names)
    if scored.exposure is not None:
        paths["exposure"] = scored.exposure.write_csv(folder / EXPOSURE_FILES["exposure"])
    if scored.gallery is not None:
        paths["exposure_gallery"] = save_exposure_gallery(folder / EXPOSURE_FILES["exposure_gallery"], scored.gallery,
                                                          bundle.class_names)
    out = scored.out
    if checkpoint and out is not None and out.module is not None:
        if out.checkpoint_format is None:
            raise ValueError(f"{out.kind}: a module to save needs its checkpoint_format")
        paths["checkpoint"] = save_checkpoint(folder / checkpoint_name(out.kind), out.module.cpu(),
                                              out.checkpoint_format,
                                              {"attack": out.settings, "dataset": bundle.name, **(meta or {})})
    return paths
