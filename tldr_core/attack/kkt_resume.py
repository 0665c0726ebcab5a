"""Loading a KKT run to continue: its kkt.pt (weights-only, like every model file) as a `KKTResume`."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tldr_core.attack.checkpoints import CheckpointError, load_kkt_candidates
from tldr_core.attack.kkt_state import KKTResume


def load_resume(path: str | Path) -> KKTResume:
    """The candidates of `path` with their optimiser state and the settings they ran with.

    CheckpointError when the file is not a KKT checkpoint, was written before runs were resumable
    (no optimiser state), or does not record its settings (meta["attack"], as the audit writes it)."""
    cand, meta = load_kkt_candidates(path)
    if not cand.resumable:
        raise CheckpointError(f"{path}: these KKT candidates were saved without their optimiser state (by a "
                              "version before resumable runs); they cannot be resumed")
    settings = meta.get("attack")
    if not isinstance(settings, Mapping):
        raise CheckpointError(f"{path}: the checkpoint does not record the settings it ran with (meta['attack'])")
    return KKTResume(cand, dict(settings))
