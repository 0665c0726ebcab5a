"""Re-audit registered classifiers that have no (recent, current) audit, compare each with the version it
would replace, and gate.

    python tune/reaudit.py --dry-run                       # what would be audited, and why
    python tune/reaudit.py --tracking-uri http://127.0.0.1:5000 --max-age-days 30 --fail-on-regression

Looks at every version of every registered model tldr-classifier-<dataset>. A version is audited when
it was never audited, when its last audit is older than --max-age-days, when an earlier audit was
interrupted (audit.status=running) or failed, when it carries the tag reaudit=requested, or when its
audit is stale (judged by an older rule, its model file changed, or it was compared with another
version than the champion it would replace). Each audit runs the audit of `tldr audit` on the version's
own data (every attack that applies: TLDR, the weight templates and KKT on fully connected models;
membership inference; the same verdict rule), with --search also a search as before whose result it
uses; compares it with the version it would replace (the champion alias, else the previous version:
a paired bootstrap on the same T and H'); logs one MLflow run with the whole audit folder (report.html
included); and writes every axis of the verdict and the comparison back as tags (audit.risk,
audit.membership, audit.regression, ...). A version whose model does not load (weights only; no pickled
code is run) gets audit.status=error and audit.error, and the others are still audited. Running it
again right after does nothing. The routine, up to `tldr registry promote NAME VERSION`: docs/registry.md.

Exit status: 0 done (or nothing to do), 1 an audit failed, 2 a one-line error, 3 a gate was hit
(--fail-on-regression: a version audited now regressed; --fail-on: an axis of one reached the level),
naming the versions.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tldr_core.attack.config import ConfigError  # noqa: E402
from tldr_core.platform import cli_flags as flags  # noqa: E402
from tldr_core.platform.registry.audits import reaudit as ra  # noqa: E402
from tldr_core.platform.registry.audits.gate import GATE_STATUS  # noqa: E402
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
    p.add_argument("--steps", type=int, default=None,
                   help="TLDR generator steps of each audit, and per trial with --search (default: the audit's, "
                        "AttackConfig's; with --search tune/search.py's, 400; 20 with --smoke-test)")
    p.add_argument("--per-class", type=int, default=None,
                   help="reconstructions per class scored (default: the audit's; 4 with --smoke-test)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny audits (20 TLDR steps, 50 KKT steps, no reference models) and tiny searches")
    p.add_argument("--seed", type=int, default=0, help="seed of each audit (and search) (default 0)")
    flags.add_device(p)
    _add_audit_flags(p)
    flags.add_data_root(p)
    p.add_argument("--download", action="store_true", help="let torchvision download a missing data set")
    p.add_argument("--quiet", action="store_true", help="do not echo the audits' and searches' progress")
    g = p.add_argument_group("gates (exit status 3, naming the versions)")
    g.add_argument("--fail-on-regression", action="store_true",
                   help="exit 3 when a version audited now is a regression against the version it would replace")
    g.add_argument("--fail-on", action="append", default=None, metavar="[AXIS:]LEVEL",
                   help="exit 3 when a verdict axis of a version audited now is at or above LEVEL (medium or high): "
                        "a bare LEVEL gates the reconstruction axis, membership:LEVEL the membership axis, any:LEVEL "
                        "both; repeatable, as tldr audit --fail-on (default: none)")
    s = p.add_argument_group("the search (--search), as tune/search.py runs it")
    s.add_argument("--search", action="store_true",
                   help="also run a search per version (warm-started from the champion generator) and audit with "
                        "its result: the best trial's reconstructions, or a KKT search's pooled candidates")
    s.add_argument("--search-attack", choices=("tldr", "kkt"), default="tldr", help="what the search searches")
    s.add_argument("--trials", type=int, default=None,
                   help="trials per search, with --search (default: tune/search.py's, 8; 2 with --smoke-test)")
    s.add_argument("--space", default=None, help="search-space YAML (default: the attack's packaged space)")
    flags.add_ray_flags(s)
    return p


def _add_audit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what each audit runs besides TLDR (the weight templates always, where they apply)")
    g.add_argument("--kkt", choices=("auto", "on", "off"), default="auto",
                   help="the KKT attack: auto runs it where the classifier's first layer is fully connected (on a "
                        "CNN it is slow on a CPU)")
    g.add_argument("--kkt-steps", type=int, default=None,
                   help="KKT steps (default: KKTConfig's, 3000; 50 with --smoke-test)")
    g.add_argument("--membership-refs", type=int, default=None, metavar="K",
                   help="reference models for offline LiRA (Ray tasks, cached); 0: loss and margin attacks only "
                        "(default: the audit's, 8; 0 with --smoke-test)")
    g.add_argument("--no-membership", action="store_true", help="skip membership inference")


def _check_args(args: argparse.Namespace) -> None:
    for name, v, lo in (("--trials", args.trials, 1), ("--steps", args.steps, 4), ("--per-class", args.per_class, 1),
                        ("--kkt-steps", args.kkt_steps, 1)):
        if v is not None and v < lo:
            raise ra.ReauditError(f"{name} must be >= {lo}, got {v}")
    if args.membership_refs is not None and (args.membership_refs < 0 or args.membership_refs == 1):
        raise ra.ReauditError(f"--membership-refs must be 0 (loss and margin only) or >= 2 (LiRA), got "
                              f"{args.membership_refs}")
    from tldr_core.attack.train import resolve_device
    from tldr_core.scoring.fail_on import parse_fail_on

    args.fail_on = parse_fail_on(args.fail_on)
    try:
        resolve_device(args.device)
    except RuntimeError as exc:  # cuda without CUDA, an unknown name: before any version is marked running
        raise ra.ReauditError(f"--device {args.device}: {ra.one_line(exc, 200)}") from None
    if args.max_age_days < 0:
        raise ra.ReauditError(f"--max-age-days must be >= 0, got {args.max_age_days}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ra.ReauditError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    from tldr_core.platform.search.tuner import check_ray_address

    check_ray_address(args.address)  # SearchError now, not after the first version was marked running
    if args.space:
        from tldr_core.platform.search.spaces.load import load_space

        load_space(args.space, args.search_attack)


def _options(args: argparse.Namespace, uri: str) -> ra.Options:
    return ra.Options(tracking_uri=uri, trials=args.trials, steps=args.steps, smoke_test=args.smoke_test,
                      data_root=args.data_root, download=args.download, space=args.space,
                      per_class=args.per_class, seed=args.seed, quiet=args.quiet, address=args.address,
                      storage=args.storage, max_concurrent=args.max_concurrent,
                      cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, search=args.search,
                      search_attack=args.search_attack, membership_refs=args.membership_refs,
                      no_membership=args.no_membership, kkt=args.kkt, kkt_steps=args.kkt_steps, device=args.device)


def _audit_all(c, todo: list, args: argparse.Namespace, uri: str, say) -> int:
    opts = _options(args, uri)
    results: dict[str, ra.Outcome] = {}

    def ensure(cand: ra.Candidate) -> None:  # a baseline whose audit cannot be compared: audit it first
        if cand.uri not in results:
            say(f"auditing {cand.uri} ({cand.reason})")
            results[cand.uri] = ra.audit_one(c, cand, opts, say)

    for cand in todo:
        if cand.uri not in results:
            say(f"auditing {cand.uri} ({cand.reason})")
            results[cand.uri] = ra.audit_one(c, cand, opts, say, ensure)
    counts = {s: sum(1 for v in results.values() if v.status == s) for s in ("done", "error", "failed")}
    say(f"re-audit finished: {counts['done']} done, {counts['error']} model(s) that do not load, "
        f"{counts['failed']} failed audit(s)")
    if _gates(results, args):
        return GATE_STATUS
    return 0 if counts["failed"] == 0 else 1


def _gates(results: dict[str, "ra.Outcome"], args: argparse.Namespace) -> bool:
    """Print every gate hit by a version audited now (stderr); whether any was hit."""
    from tldr_core.scoring.fail_on import failing

    hits = []
    for uri, out in results.items():
        if args.fail_on_regression and out.regression:
            hits.append(f"{uri} regressed against {out.compared_with} on {', '.join(out.axes)}")
        hits += [f"{uri}: the {axis} verdict {level} is at or above --fail-on {gate}"
                 for axis, level, _bar, gate in failing(out.levels, args.fail_on)]
    for line in hits:
        print(f"gate: {line}", file=sys.stderr, flush=True)
    if hits:
        print(f"gate: exit status {GATE_STATUS}", file=sys.stderr, flush=True)
    return bool(hits)


def main(argv: list[str] | None = None) -> int:
    """0: every pending version audited (or nothing to do); 1: an audit failed; 2: a one-line error; 3: a gate
    (--fail-on-regression, --fail-on) was hit."""
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
