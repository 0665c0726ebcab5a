"""`tldr`: one command line for every tldr command (the console entry point in pyproject.toml).

    tldr audit --dataset mnist-bundled --out runs/demo          = python -m tldr_core.cli.audit ...
    tldr search --smoke-test                                    = python tune/search.py ...
    tldr reaudit --dry-run                                      = python tune/reaudit.py ...
    tldr registry show --dataset mnist-bundled                  = python -m tldr_core.platform.registry.cli ...
    tldr controls --smoke-test                                  = python -m tldr_core.cli.controls ...
    tldr defence --dataset mnist-bundled                        = python -m tldr_core.cli.defence ...
    tldr <command> --help                                       every option of a command, with its default

A thin dispatcher: each command is the `main(argv)` of its module, imported only when it runs (the
audit needs no Ray or MLflow installed), with the same flags and exit statuses as the documented
`python -m ...` / `python tune/...` forms: 0 done, 2 a one-line `error:`, 3 the audit's --fail-on,
130 interrupted. Shared flags (--tracking-uri, --classifier, --data-root, --device, --address,
--storage) mean the same in every command (`tldr_core.platform.cli_flags`).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

#: command -> (module whose main(argv) runs it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("tldr_core.cli.audit", "audit one classifier: attack, scores, verdict, report (optionally in MLflow)"),
    "search": ("tldr_core.platform.search.cli", "Ray Tune + Optuna search over the attack's settings, in MLflow"),
    "reaudit": ("tldr_core.platform.registry.audits.reaudit_cli", "re-audit registered classifiers without a recent audit"),
    "registry": ("tldr_core.platform.registry.cli", "promote a search's generator, or show the registered versions"),
    "controls": ("tldr_core.cli.controls", "every attack on classifiers whose leakage is known"),
    "controls-rescore": ("tldr_core.cli.controls_rescore", "re-judge a controls run's saved cells with the current rule"),
    "defence": ("tldr_core.cli.defence", "training choices (optimiser, weight decay, ...) against leakage"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tldr <command> [options]      (tldr <command> --help: every option and its default)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_m, text) in COMMANDS.items()]
    return "\n".join(lines)


def command(name: str) -> Callable[[list[str] | None], int]:
    """The main(argv) of command `name` (imports its module)."""
    return importlib.import_module(COMMANDS[name][0]).main


def main(argv: list[str] | None = None) -> int:
    """Run `tldr <command> ...`; returns the command's exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as tune/search.py: before Ray is imported anywhere
    from tldr_core.platform import cli_flags

    cli_flags.invoked_as = f"tldr {name}"
    return int(command(name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
