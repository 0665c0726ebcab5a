"""Re-audit registered classifiers that have no (recent) audit result (the command).

    python tune/reaudit.py --dry-run                       # what would be audited, and why
    python tune/reaudit.py --help

A thin launcher: the logic is `tldr_core.platform.registry.audits.reaudit` and this command line is
`tldr_core.platform.registry.audits.reaudit_cli`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tldr_core") is None:  # a checkout run by path, not installed: use its package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tldr_core.platform.registry.audits.reaudit_cli import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
