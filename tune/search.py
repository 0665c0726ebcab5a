"""Ray Tune + Optuna search over the TLDR loss weights and conditioning variants (the command).

    python tune/search.py --dataset mnist-bundled --trials 8
    python tune/search.py --help

A thin launcher: the search is `tldr_core.platform.search.driver.run` and this command line is
`tldr_core.platform.search.cli`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tldr_core") is None:  # a checkout run by path, not installed: use its package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tldr_core.platform.search.cli import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
