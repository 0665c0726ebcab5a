"""One audit run: classifier (trained once, cached) -> attack -> scores -> membership -> two-axis verdict.

    python -m tldr_core.cli.audit --dataset mnist-bundled --train-size 1000 --out runs/demo
    python -m tldr_core.cli.audit --attack kkt --kkt-steps 2000 ...   # the stationarity (KKT) attack
    python -m tldr_core.cli.audit ... --fail-on high                  # exit status 3 on a HIGH reconstruction verdict
    python -m tldr_core.cli.audit ... --fail-on membership:medium     # ... or on the membership axis (any:LEVEL: both)
    python -m tldr_core.cli.audit ... --membership-refs 16            # LiRA with 16 reference models (Ray tasks)
    python -m tldr_core.cli.audit ... --tracking-uri [URI]            # also one MLflow run (platform/tracking)
    python -m tldr_core.cli.audit --classifier models:/tldr-classifier-mnist-bundled/1   # a registered version

writes into --out: metrics.json, reconstructions.npz, grid.png, nearest.png, exposure.csv (every
training image's calibrated and raw exposure), exposure.png (the most exposed ones), membership.csv
(every image's membership scores), the attack's checkpoint (generator.pt, or kkt.pt with --attack kkt)
and report.html (tldr_core.report.audit_files). The verdict has two axes: reconstruction (the worst
attack's level, tldr_core.scoring.risk: "risk", "reasons", "criterion", "risk_attack") and membership
(tldr_core.scoring.membership_risk: "membership"), with one sentence for both ("verdict"). --out is
checked before any work (writable, not a file, empty unless --overwrite, no other audit writing it: a
lock beside it); files are written to a staging folder beside it that replaces --out in one rename at
the end, so a failed run leaves the previous output as it was (tldr_core.cli.output_folder). Exit
status: 0 done, 2 bad input or a failed run, 3 a verdict axis is at or above --fail-on, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from tldr_core.attack.bounds import check_kkt_candidates
from tldr_core.attack.checkpoints import CheckpointError
from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.config import (GRAD_MODES, GRAD_SCOPES, MODES, PERTURBATIONS, VARIANTS, AttackConfig, ConfigError,
                                     LossWeights, load_yaml_config)
from tldr_core.attack.data import DATASETS, DataError, DatasetNotFoundError, load_dataset
from tldr_core.attack.images import parse_image_size
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.train import NonFiniteLossError, resolve_device
from tldr_core.cli.attack_flags import (ATTACKS, add_kkt_flags, add_prior_flags, check_attack_flags,
                                        kkt_config_from_args, kkt_resume_from_args)
from tldr_core.cli.audit_parts import (FAIL_STATUS, check_membership_flags, describe_attack, fail_on_status,
                                       load_audited_classifier, membership_refs, parse_fail_on, summary_lines)
from tldr_core.cli.output_folder import OutputError, StagedOutput
from tldr_core.paths import runs_dir
from tldr_core.platform import cli_flags as flags
from tldr_core.report.artifacts import checkpoint_name
from tldr_core.report.audit_files import MEMBERSHIP_CSV, write_audit_folder
from tldr_core.scoring.audit import AuditResults, run_audit

OUTPUT_FILES = ("metrics.json", "reconstructions.npz", "grid.png", "nearest.png", "exposure.csv", "exposure.png",
                MEMBERSHIP_CSV, "generator.pt", "report.html")
#: What --overwrite may replace: the files any audit writes (".partial": older versions' staging folder).
OUTPUT_NAMES = frozenset({*OUTPUT_FILES, *(checkpoint_name(k) for k in ATTACKS), ".partial"})


def output_files(kind: str = "tldr", membership: bool = True) -> tuple[str, ...]:
    """The files an audit with attack ``kind`` leaves in --out (its checkpoint named by kind; membership.csv
    only when membership inference ran)."""
    return tuple(checkpoint_name(kind) if n == "generator.pt" else n for n in OUTPUT_FILES
                 if membership or n != MEMBERSHIP_CSV)


# ------------------------------------------------------------------------------------------- CLI

def _weight_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("python -m tldr_core.cli.audit", __doc__)
    d = p.add_argument_group("data and classifier")
    d.add_argument("--dataset", default="mnist-bundled", help=f"one of {', '.join(DATASETS)} (default mnist-bundled)")
    d.add_argument("--train-size", type=int, default=1000, help="classifier training-set size T (default 1000)")
    flags.add_data_root(d)
    d.add_argument("--download", action="store_true", help="allow torchvision to download the data set")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the train/held-out split (default 0)")
    flags.add_classifier(d, "train one, or reuse the cached one trained with the same settings")
    d.add_argument("--arch", default="cnn", choices=["cnn", "mlp"], help="architecture when training (default cnn)")
    d.add_argument("--classifier-epochs", type=int, default=None,
                   help=f"epochs when training the classifier (default {ClassifierSettings.epochs}; 2 with --smoke-test "
                        "unless given)")
    d.add_argument("--image-size", default=None, metavar="HxW",
                   help="image-folder only: resize every image to this size (HxW, or one number for a square); "
                        "without it (the default), images of different sizes are an error")
    p.add_argument("--attack", choices=ATTACKS, default="tldr",
                   help="tldr: train a conditioned generator against the classifier (default); kkt: optimise "
                        "candidate images whose margin gradients add up to the weights (docs/method.md section 8; "
                        "settings: the --kkt-* flags)")
    a = p.add_argument_group("TLDR attack (defaults, then --config YAML, then these flags); --seed and --device "
                             "also serve --attack kkt")
    a.add_argument("--config", default=None,
                   help="YAML file with attack settings and/or a weights: mapping (default: none, the built-in defaults)")
    a.add_argument("--variant", choices=VARIANTS, default=None, help="conditioning variant (default vector-matrix)")
    a.add_argument("--mode", choices=MODES, default=None, help="inversion (4 terms) or reconstruction (9 terms)")
    a.add_argument("--steps", type=int, default=None, help="generator training steps")
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--epsilon", type=float, default=None, help="L-inf radius of the perturbation")
    a.add_argument("--perturbation", choices=PERTURBATIONS, default=None)
    a.add_argument("--grad-mode", choices=GRAD_MODES, default=None)
    a.add_argument("--grad-scope", choices=GRAD_SCOPES, default=None)
    a.add_argument("--per-class", type=int, default=None, help="reconstructions per class to score")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto, cuda when available)")
    add_prior_flags(a)
    _show_config_defaults(a)
    w = p.add_argument_group("loss weights (docs/method.md; 0 switches a term off)")
    for name in LossWeights.names():
        w.add_argument(_weight_flag(name), dest=f"w_{name}", default=None, metavar="W",
                       help=f"weight of {name} (default {getattr(LossWeights(), name)})")
    add_kkt_flags(p)
    _add_membership_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default runs/audit under the runs folder: $TLDR_RUNS, "
                   "else ./runs); must be empty or absent unless --overwrite")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an earlier audit's output in --out (swapped in only once the new one is complete)")
    o.add_argument("--tau", type=float, default=0.5, help="SSIM threshold for coverage (default 0.5)")
    o.add_argument("--smoke-test", action="store_true", help="tiny run (few steps, small sets) to check the set-up")
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--fail-on", action="append", default=None, metavar="[AXIS:]LEVEL",
                   help=f"after writing everything, exit with status {FAIL_STATUS} when a verdict axis is at or above "
                        "LEVEL (medium or high): a bare LEVEL gates the reconstruction verdict (the worst attack's), "
                        "membership:LEVEL the membership axis, any:LEVEL both; repeatable (default: none, the exit "
                        "status ignores the verdict)")
    flags.add_tracking_uri(o, optional_value=True)
    return p


def _add_membership_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("membership inference (the verdict's second axis; docs/method.md section 10)")
    g.add_argument("--membership-refs", type=int, default=None, metavar="K",
                   help="reference models for offline LiRA, trained as parallel Ray tasks on population images only "
                        "and cached; 0 runs the loss and margin attacks only (default 8; 0 with --smoke-test)")
    g.add_argument("--no-membership", action="store_true", help="skip membership inference (one axis only)")
    g.add_argument("--ref-set", action="append", default=[], metavar="NAME=VALUE",
                   help="a training setting of the reference models that the audited checkpoint does not record "
                        "(e.g. epochs=15); repeatable (default: none, the checkpoint's settings)")
    g.add_argument("--address", default=None,
                   help="a running Ray cluster for the reference models (host:port, ray://host:port or auto) "
                        "(default: a local Ray with this machine's cores)")


def _show_config_defaults(group: Any) -> None:
    """--help shows AttackConfig's default beside each attack flag that does not state one (their
    argparse default is None: unset flags leave --config's value)."""
    defaults = AttackConfig()
    for action in group._group_actions:  # noqa: SLF001 - the group's own options
        if action.default is None and hasattr(defaults, action.dest) and "default" not in (action.help or ""):
            action.help = f"{action.help + ' ' if action.help else ''}(default {getattr(defaults, action.dest)})"


def config_from_args(args: argparse.Namespace) -> AttackConfig | KKTConfig:
    """The attack's settings: a KKTConfig with --attack kkt, else an AttackConfig (defaults, --config, flags).
    Flags of the other attack are a ConfigError."""
    check_attack_flags(args)
    if args.attack == "kkt":
        return kkt_config_from_args(args)
    cfg = load_yaml_config(args.config) if args.config else AttackConfig()
    flat: dict[str, Any] = {}
    for key in ("variant", "mode", "steps", "batch_size", "lr", "epsilon", "perturbation", "grad_mode", "grad_scope",
                "per_class", "seed", "device", "bn", "jitter", "flip"):
        if getattr(args, key) is not None:
            flat[key] = getattr(args, key)
    for name in LossWeights.names():
        if getattr(args, f"w_{name}") is not None:
            flat[name] = getattr(args, f"w_{name}")  # strings: LossWeights parses and checks them
    if args.smoke_test:
        flat.setdefault("steps", 20)
        flat.setdefault("per_class", 4)
    return AttackConfig.from_flat(flat, base=cfg)


def check_args(args: argparse.Namespace) -> tuple[AttackConfig | KKTConfig, tuple[int, int] | None, str]:
    """(attack settings, --image-size, device): every input check that needs no data, before --out is
    touched or anything is loaded."""
    cfg = config_from_args(args)
    if not 0 < args.tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {args.tau}")
    if args.classifier_epochs is not None and args.classifier_epochs < 1:
        raise ConfigError(f"--classifier-epochs must be >= 1, got {args.classifier_epochs}")
    image_size = parse_image_size(args.image_size) if args.image_size is not None else None
    check_membership_flags(args)
    args.fail_on = parse_fail_on(args.fail_on)
    return cfg, image_size, str(resolve_device(cfg.device))


def run(args: argparse.Namespace, cfg: AttackConfig | KKTConfig, image_size: tuple[int, int] | None, device: str,
        target: StagedOutput, log: Callable[[str], None],
        mlflow_uri: str | None = None) -> tuple[AuditResults, Path]:
    """Data, classifier, attack, scores, then the files into ``target``, then (with ``mlflow_uri``) one
    MLflow run of it all; (results, metrics.json path)."""
    train_size = min(args.train_size, 200) if args.smoke_test else args.train_size
    bundle = load_dataset(args.dataset, train_size, seed=args.data_seed, data_root=args.data_root,
                          download=args.download, test_size=500 if args.smoke_test else None, image_size=image_size)
    log(f"data: {bundle.name} T={len(bundle.train)} H'={len(bundle.heldout)} test={len(bundle.test)} "
        f"{bundle.image_shape} from {bundle.source}")
    if isinstance(cfg, KKTConfig):  # the data-dependent candidate bound, before a classifier is trained
        per = bundle.train_per_class()
        check_kkt_candidates(cfg.candidates_per_class(per), per, bundle.num_classes, tuple(bundle.image_shape))
    classifier, info = load_audited_classifier(args, bundle, device, log, mlflow_uri)
    refs = membership_refs(args, classifier, info, bundle, device, log)  # before the attack: a bad flag fails fast
    log(describe_attack(cfg, device))
    res = run_audit(classifier, bundle, cfg, tau=args.tau, log=log, meta=info, membership_refs=refs,
                    resume=kkt_resume_from_args(args) if isinstance(cfg, KKTConfig) else None)
    spec = classifier.spec() if hasattr(classifier, "spec") else None
    if target.stage is None:
        raise OutputError("the output folder is not open")
    record = write_audit_folder(target.stage, bundle, res, info, spec=spec)
    path = target.commit() / "metrics.json"
    if mlflow_uri is not None:  # the first thing written to the store: after data, classifier and files
        from tldr_core.platform.tracking.audit_run import log_audit

        log_audit(mlflow_uri, path.parent, record, bundle, say=log)
    return res, path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        cfg, image_size, device = check_args(args)  # all input checks happen before any work or output
        mlflow_uri = mlflow_target(args)
        out = args.out or str(runs_dir() / "audit")  # $TLDR_RUNS: a pod's writable volume, not its read-only cwd
        with StagedOutput(out, overwrite=args.overwrite, names=OUTPUT_NAMES) as target:
            res, path = run(args, cfg, image_size, device, target, log, mlflow_uri)
    except (ConfigError, DataError, DatasetNotFoundError, CheckpointError, NonFiniteLossError, OutputError,
            RuntimeError, OSError) as exc:
        return flags.print_error(exc)  # one line, credentials in URIs redacted
    except MemoryError as exc:  # what the bounds let through but this machine cannot hold: a refusal too
        return flags.print_error(f"not enough memory for this audit ({str(exc) or 'MemoryError'}); use smaller inputs")
    except KeyboardInterrupt:
        print("error: interrupted; --out holds the earlier output unless this audit had finished writing it",
              file=sys.stderr)
        return 130
    for line in summary_lines(res, args.tau):
        log(line)
    log(f"wrote {path.parent}/ ({', '.join(output_files(res.attack.kind, res.membership is not None))})")
    return fail_on_status(res, args.fail_on)


def mlflow_target(args: argparse.Namespace) -> str | None:
    """The MLflow store this audit logs to (--tracking-uri, or the default store for a models:/ classifier),
    checked now without creating anything; None when it is not logged."""
    if args.tracking_uri is None and not (args.classifier or "").startswith("models:/"):
        return None
    from tldr_core.platform.tracking.audit_run import check_target, target_uri

    uri = target_uri(args.tracking_uri, args.classifier)
    check_target(uri, args.classifier)
    return uri


if __name__ == "__main__":
    sys.exit(main())
