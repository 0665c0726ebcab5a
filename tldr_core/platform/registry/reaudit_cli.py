"""Re-audit registered classifiers that have no (recent) audit result.

    python tune/reaudit.py --dry-run                       # what would be audited, and why
    python tune/reaudit.py --tracking-uri http://127.0.0.1:5000 --max-age-days 30

Looks at every version of every registered model tldr-classifier-<dataset>. A version is audited
when it was never audited, when its last audit is older than --max-age-days, when an earlier audit
was interrupted (audit.status=running) or failed, or when it carries the tag reaudit=requested.
Each audit is a search (as tune/search.py runs it) against that version, warm-started from the
settings of the data set's champion generator (enqueued as the search's first point); the search
registers and promotes its generator as usual, and the result is written back onto the classifier
version as tags audit.quality, audit.gap, audit.coverage, audit.risk, audit.run_id, audit.time,
audit.status=done. A version whose model does not load (weights only; no pickled code is run) gets
audit.status=error and audit.error, and the others are still audited. Running it again right after
does nothing. Details: tldr_core/platform/registry/reaudit.py.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tldr_core.attack.config import ConfigError  # noqa: E402
from tldr_core.platform import cli_flags as flags  # noqa: E402
from tldr_core.platform.registry import reaudit as ra  # noqa: E402
from tldr_core.platform.search.settings import SearchError  # noqa: E402
from tldr_core.platform.tracking import store as tr  # noqa: E402
from tldr_core.platform.tracking.uris import UriError, normalize_tracking_uri  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("python tune/reaudit.py", __doc__)
    flags.add_tracking_uri(p)
    p.add_argument("--max-age-days", type=float, default=30.0,
                   help="re-audit versions whose last audit is older than this many days (default 30)")
    p.add_argument("--dry-run", action="store_true", help="list what would be audited and why; change nothing")
    p.add_argument("--dataset", default=None, help="only tldr-classifier-<DATASET> (default: every data set)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per audit search (default: tune/search.py's, 8; 2 with --smoke-test)")
    p.add_argument("--steps", type=int, default=None,
                   help="generator steps per trial (default: tune/search.py's, 400; 20 with --smoke-test)")
    p.add_argument("--per-class", type=int, default=None,
                   help="reconstructions per class scored per trial (default: tune/search.py's)")
    p.add_argument("--smoke-test", action="store_true", help="tiny audit searches (tune/search.py --smoke-test)")
    p.add_argument("--space", default=None, help="search-space YAML (default tune/space.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of each audit search (default 0)")
    flags.add_data_root(p)
    p.add_argument("--download", action="store_true", help="let torchvision download a missing data set")
    p.add_argument("--quiet", action="store_true", help="do not echo the searches' output")
    flags.add_ray_flags(p.add_argument_group("where each audit's search runs (Ray), as tune/search.py"))
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name, v, lo in (("--trials", args.trials, 1), ("--steps", args.steps, 4), ("--per-class", args.per_class, 1)):
        if v is not None and v < lo:
            raise ra.ReauditError(f"{name} must be >= {lo}, got {v}")
    if args.max_age_days < 0:
        raise ra.ReauditError(f"--max-age-days must be >= 0, got {args.max_age_days}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ra.ReauditError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    from tldr_core.platform.search.tuner import check_ray_address

    check_ray_address(args.address)  # SearchError now, not after the first version was marked running
    if args.space:
        from tldr_core.platform.search.spaces.load import load_space

        load_space(args.space)


def _audit_all(c, todo: list, args: argparse.Namespace, uri: str, say) -> int:
    opts = ra.Options(tracking_uri=uri, trials=args.trials, steps=args.steps, smoke_test=args.smoke_test,
                      data_root=args.data_root, download=args.download, space=args.space,
                      per_class=args.per_class, seed=args.seed, quiet=args.quiet, address=args.address,
                      storage=args.storage, max_concurrent=args.max_concurrent,
                      cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    results: dict[str, str] = {}
    for cand in todo:
        say(f"auditing {cand.uri} ({cand.reason})")
        results[cand.uri] = ra.audit_one(c, cand, opts, say)
    counts = {s: sum(1 for v in results.values() if v == s) for s in ("done", "error", "failed")}
    say(f"re-audit finished: {counts['done']} done, {counts['error']} model(s) that do not load, "
        f"{counts['failed']} failed search(es)")
    return 0 if counts["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """0: every pending version audited (or nothing to do); 1: a search failed; 2: a one-line error."""
    args = build_parser().parse_args(argv)
    say = lambda s: print(s, flush=True)  # noqa: E731
    tr.quiet_mlflow_env()
    try:
        uri = normalize_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        _check_args(args)
        tr.check_tracking_uri(uri)
        c = tr.client(uri)
        try:
            todo, done = ra.find_candidates(c, args.max_age_days, args.dataset)
        except Exception as exc:  # noqa: BLE001 - e.g. a database URI that is not an MLflow store
            raise tr.TrackingError(f"cannot list registered models in {uri}: {ra.one_line(exc, 300)}") from None
        scope = f"tldr-classifier-{args.dataset}" if args.dataset else "tldr-classifier-*"
        say(f"re-audit of {scope} in {tr.redact(uri)}: {len(todo)} version(s) to audit, {len(done)} up to date "
            f"(max age {args.max_age_days:g} days)")
        for cand in todo:
            say(f"  {'would audit' if args.dry_run else 'to audit'} {cand.uri}: {cand.reason}")
        return 0 if args.dry_run or not todo else _audit_all(c, todo, args, uri, say)
    except KeyboardInterrupt:
        print("\ninterrupted: the version being audited stays audit.status=running and is audited next time",
              file=sys.stderr)
        return 130
    except (ra.ReauditError, ConfigError, tr.TrackingError, UriError, SearchError) as exc:
        return flags.print_error(exc)


if __name__ == "__main__":
    sys.exit(main())
