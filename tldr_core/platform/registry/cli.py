"""`tldr registry`: the registry on the command line.

    tldr registry promote NAME VERSION [--force]    (alias champion -> VERSION, through the gate)
    tldr registry promote --search-run RUN_ID      (promotion for an existing search)
    tldr registry show --dataset mnist-bundled      (versions, tags and the champion)

`promote NAME VERSION` refuses a version whose audit is missing, stale or regressed (exit status 3,
the reasons on stderr; tldr_core.platform.registry.audits.gate); --force promotes it anyway and tags who and
when. The routine: docs/registry.md.

(also `python -m tldr_core.platform.registry.cli ...`)
"""
from __future__ import annotations

import argparse
import os
import sys

from tldr_core.platform import cli_flags as flags
from tldr_core.platform.registry.champion import CHAMPION, PromotionLockError
from tldr_core.platform.registry.audits.gate import GATE_STATUS, promote_version
from tldr_core.platform.registry.models import alias_version, model_versions
from tldr_core.platform.registry.names import RegistryError, classifier_model_name, generator_model_name
from tldr_core.platform.registry.promotion import promote
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.uris import UriError, normalize_tracking_uri


def _show(c, dataset: str) -> int:
    for name in (classifier_model_name(dataset), generator_model_name(dataset)):
        versions = sorted(model_versions(c, name), key=lambda v: int(v.version))
        if not versions:
            print(f"{name}: no versions")
            continue
        holder = alias_version(c, name, CHAMPION)
        print(f"{name}:")
        for v in versions:
            mark = f"  @{CHAMPION}" if holder is not None and holder.version == v.version else ""
            keys = ("test_accuracy", "sha256", "audit.risk", "audit.membership", "audit.regression") \
                if "classifier" in name else ("objective", "objective_value", "classifier_version", "search_run")
            info = ", ".join(f"{k}={v.tags.get(k, '')[:16] if k == 'sha256' else v.tags.get(k, '')}" for k in keys)
            print(f"  version {v.version}{mark}: {info}")
    return 0


def _promote_version(c, args: argparse.Namespace) -> int:
    if len(args.target) != 2 or args.search_run is not None:
        raise RegistryError("promote takes NAME VERSION (a registered model and a version) or --search-run RUN_ID")
    name, version = args.target
    res = promote_version(c, name, version, force=args.force)
    for why in res.reasons:
        print(f"{'overridden' if res.forced else 'refused'}: models:/{name}/{res.version}: {why}", file=sys.stderr)
    if not res.promoted:
        print(f"promotion refused: models:/{name}/{res.version} stays without the {CHAMPION} alias "
              f"(--force to promote it anyway): exit status {GATE_STATUS}", file=sys.stderr)
        return GATE_STATUS
    print(f"models:/{name}/{res.version} is now @{CHAMPION}" + (f" (replacing version {res.replaced})" if res.replaced
                                                               else "") + (" (forced; tagged)" if res.forced else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`promote` and `show`; --tracking-uri before or after the subcommand."""
    p = flags.parser("python -m tldr_core.platform.registry.cli", __doc__)
    flags.add_tracking_uri(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("promote", help="NAME VERSION: alias champion -> VERSION if its audit allows it (--force: "
                                        "anyway, tagged); --search-run: register a search's best generator",
                        formatter_class=flags.HelpFormatter)
    pr.add_argument("target", nargs="*", metavar="NAME VERSION",
                    help="a registered model and one of its versions (default: none, --search-run instead)")
    pr.add_argument("--search-run", default=None, help="run id of the search (parent) run (default: none)")
    pr.add_argument("--force", action="store_true",
                    help="promote NAME VERSION although its audit is missing, stale or regressed (tagged on the "
                         "version: promotion.forced, promotion.forced_by, promotion.forced_at)")
    sh = sub.add_parser("show", help="list registered classifier/generator versions of a data set",
                        formatter_class=flags.HelpFormatter)
    sh.add_argument("--dataset", required=True)
    for sp in (pr, sh):  # also accepted after the subcommand (`show --tracking-uri X`); SUPPRESS keeps one given before
        flags.add_tracking_uri(sp, default=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        uri = normalize_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        tr.check_tracking_uri(uri)
        c = tr.client(uri)
        if args.cmd == "show":
            return _show(c, args.dataset)
        if args.target or args.search_run is None:
            return _promote_version(c, args)
        if args.force:
            raise RegistryError("--force applies to promote NAME VERSION, not to --search-run")
        res = promote(c, args.search_run)
    except (RegistryError, tr.TrackingError, PromotionLockError, UriError) as exc:
        return flags.print_error(exc)
    except Exception as exc:  # noqa: BLE001 - MlflowException for an unknown run id etc.
        if type(exc).__name__ == "MlflowException":
            return flags.print_error(exc)
        raise
    if res.version:
        print(f"{res.name} version {res.version}: {'champion' if res.promoted else 'not promoted'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
