"""Where tldr writes files: one place, read from the environment or the working directory.

Nothing here looks at ``__file__``: an installed (non-editable) package lives in site-packages,
where a ``runs/`` folder would be wrong or read-only. ``TLDR_RUNS`` moves everything (pods point it
at an emptyDir or a PVC); ``TLDR_CACHE`` moves only the classifier cache.
"""
from __future__ import annotations

import os
from pathlib import Path


def runs_dir() -> Path:
    """The runs folder, absolute: ``$TLDR_RUNS``, else ``./runs`` under the working directory."""
    return Path(os.environ.get("TLDR_RUNS") or Path.cwd() / "runs").resolve()


def cache_dir() -> Path:
    """The cache folder: ``$TLDR_CACHE``, else ``<runs>/cache``."""
    env = os.environ.get("TLDR_CACHE")
    return Path(env).resolve() if env else runs_dir() / "cache"
