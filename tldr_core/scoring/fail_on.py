"""`--fail-on [AXIS:]LEVEL`: which verdict axis at which level fails a command (`tldr audit`, `tldr reaudit`).

    parse_fail_on(["high", "membership:medium"])  -> [("reconstruction", "HIGH"), ("membership", "MEDIUM")]
    failing({"reconstruction": "HIGH", "membership": "LOW"}, [("any", "MEDIUM")])  -> [("reconstruction", "HIGH", ...)]

A bare LEVEL gates the reconstruction axis (as before the verdict had two); "membership:LEVEL" the
membership axis; "any:LEVEL" both. Shared by the audit's command line and the re-audit's, so both parse
and judge it alike.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tldr_core.attack.config import ConfigError
from tldr_core.scoring.risk import LEVELS

__all__ = ["AXES", "parse_fail_on", "failing", "spelled"]

AXES = ("reconstruction", "membership", "any")


def parse_fail_on(values: Sequence[str] | None) -> list[tuple[str, str]]:
    """["high", "membership:medium"] -> [("reconstruction", "HIGH"), ("membership", "MEDIUM")]; ConfigError
    for anything else."""
    out = []
    for v in values or []:
        axis, _, level = v.rpartition(":")
        axis = axis or "reconstruction"
        if axis not in AXES or level.lower() not in ("medium", "high"):
            raise ConfigError(f"--fail-on expects [AXIS:]LEVEL with AXIS one of {', '.join(AXES)} and LEVEL medium "
                              f"or high, got {v!r}")
        out.append((axis, level.upper()))
    return out


def spelled(axis: str, bar: str) -> str:
    """How the user wrote a parsed gate: "high", "membership:medium", "any:high"."""
    return f"{'' if axis == 'reconstruction' else axis + ':'}{bar.lower()}"


def failing(levels: Mapping[str, str], fail_on: Sequence[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """(axis, its level, the bar, the gate as written) of every axis of ``levels`` at or above a gate of
    ``fail_on``; a level that is not LOW/MEDIUM/HIGH (e.g. "not run") never fails."""
    out = []
    for axis, bar in fail_on:
        for name in (("reconstruction", "membership") if axis == "any" else (axis,)):
            level = levels.get(name, "")
            if level in LEVELS and LEVELS.index(level) >= LEVELS.index(bar):
                out.append((name, level, bar, spelled(axis, bar)))
    return out
