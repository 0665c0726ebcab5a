"""The flags the commands share (`tldr audit|search|reaudit|registry|controls`), each defined once so its
name, default and help read the same everywhere, and the help formatter that shows every default.

    --tracking-uri URI     MLflow store: $MLFLOW_TRACKING_URI, else sqlite:///<runs folder>/mlflow.db
    --classifier FILE|URI  a tldr checkpoint file or a registry URI (models:/NAME/VERSION, models:/NAME@ALIAS)
    --data-root PATH       where the data set is (folder or .npz); default: the loader's own place
    --device NAME          cpu, cuda or auto (the commands that run an attack in this process)
    --address, --storage, --cpus-per-trial, --gpus-per-trial, --max-concurrent   (the Ray ones)

The platform's command lines import this module (the `cli` layer may too): it needs only argparse.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from tldr_core.platform.tracking.uris import redact

#: How the running command was typed when the `tldr` dispatcher started it ("tldr search"); None otherwise.
#: Help texts, resume hints and MLflow's mlflow.source.name use it instead of the module's own name.
invoked_as: str | None = None

TRACKING_DEFAULT = "$MLFLOW_TRACKING_URI, else sqlite:///<runs folder>/mlflow.db ($TLDR_RUNS, else ./runs)"
CLASSIFIER_HELP = ("the classifier to audit: a tldr checkpoint file (loaded weights-only), or a registry URI "
                   "models:/NAME/VERSION or models:/NAME@ALIAS (read from --tracking-uri's store)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends "(default: X)" to every option whose help does not
    already state its default. Options defaulting to None must say in words what None means (the
    tests check that every option's help shows a default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                               argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
            return text
        return f"{text} (default: %(default)s)"


def print_error(exc: BaseException | str) -> int:
    """Print `error: <first line>` to stderr, credentials redacted (URIs in messages included); returns 2,
    every command's exit status for a mistake the user can fix."""
    text = str(exc) if str(exc) else type(exc).__name__
    print(f"error: {redact(text.strip().splitlines()[0] if text.strip() else text)}", file=sys.stderr)
    return 2


def command_name(default: str) -> str:
    """`invoked_as` when the dispatcher set it, else `default` (e.g. "python tune/search.py")."""
    return invoked_as or default


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with `HelpFormatter`, named as the command was typed (`command_name`)."""
    return argparse.ArgumentParser(prog=command_name(prog), description=description, formatter_class=HelpFormatter)


def add_tracking_uri(p: Any, *, optional_value: bool = False, **kw: Any) -> None:
    """--tracking-uri. optional_value: the flag alone means "log, to the default store" (the audit, which
    logs to MLflow only when asked)."""
    if optional_value:
        p.add_argument("--tracking-uri", nargs="?", const="", default=None, metavar="URI",
                       help=f"log this run to MLflow: one run with its settings, scores and files (default: not "
                            f"logged; the flag without a URI: {TRACKING_DEFAULT})", **kw)
        return
    p.add_argument("--tracking-uri", metavar="URI", **{"default": None, **kw},
                   help=f"MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: {TRACKING_DEFAULT})")


def add_classifier(p: Any, default_text: str) -> None:
    p.add_argument("--classifier", default=None, metavar="FILE|models:/...",
                   help=f"{CLASSIFIER_HELP} (default: {default_text})")


def add_data_root(p: Any) -> None:
    p.add_argument("--data-root", default=None, metavar="PATH",
                   help="folder holding the data set (torchvision layout or image folder), or the .npz file for "
                        "--dataset npz / cifar10 (default: $TLDR_DATA_ROOT, else ~/.cache/tldr/data; the bundled and "
                        "scikit-learn sets need none)")


def add_device(p: Any, default: str = "auto") -> None:
    p.add_argument("--device", default=default, metavar="NAME",
                   help="cpu, cuda (or cuda:N) or auto = cuda when available")


def add_ray_flags(p: Any) -> None:
    """Where and how the trials run (Ray): --address, --storage and the per-trial resources."""
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (host:port, ray://host:port or auto) (default: start a local Ray "
                        "with this machine's cores)")
    p.add_argument("--storage", default=None,
                   help="where Ray Tune keeps the search state: a local folder or s3://bucket/prefix "
                        "(default: runs/tune under the runs folder: $TLDR_RUNS, else ./runs)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: as many as the resources allow locally, 8 on a cluster)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial, fractional allowed (0.25 packs four trials on a GPU)")


def parse_value(text: str) -> Any:
    """A NAME=VALUE flag's value: '3000' -> 3000, '1e-2' -> 0.01, 'true' -> True, 'null' -> None, anything
    else the string (stripped). The setting it is given to checks its type and range."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()
