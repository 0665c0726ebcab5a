"""One audit run: classifier (trained once, cached) -> attack -> reconstructions -> scores -> verdict.

    python -m tldr_core.cli.audit --dataset mnist-bundled --train-size 1000 --out runs/demo
    python -m tldr_core.cli.audit --attack kkt --kkt-steps 2000 ...   # the stationarity (KKT) attack
    python -m tldr_core.cli.audit ... --fail-on high                  # exit status 3 on a HIGH verdict
    python -m tldr_core.cli.audit ... --tracking-uri [URI]            # also one MLflow run (platform/audit_tracking)
    python -m tldr_core.cli.audit --classifier models:/tldr-classifier-mnist-bundled/1   # a registered version

writes into --out: metrics.json, reconstructions.npz, grid.png, nearest.png, exposure.csv (every
training image's exposure), exposure.png (the most exposed ones), the attack's checkpoint
(generator.pt, or kkt.pt with --attack kkt) and report.html. metrics.json records the verdict:
"risk" (LOW/MEDIUM/HIGH), "reasons", "criterion", "thresholds" and "risk_attack" of the worst attack,
and the same per attack under "risks" (tldr_core.scoring.risk). --out is checked before any work
(writable, not a file, empty unless --overwrite, no other audit writing it: a lock beside it); files
are written to a staging folder beside it that replaces --out in one rename at the end, so a failed
run leaves the previous output as it was (tldr_core.cli.output_folder). Exit status: 0 done, 2 bad
input or a failed run, 3 the verdict is at or above --fail-on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from tldr_core.attack.checkpoints import CheckpointError, load_classifier
from tldr_core.attack.classifier import ClassifierSettings, load_or_train
from tldr_core.attack.config import (GRAD_MODES, GRAD_SCOPES, MODES, PERTURBATIONS, VARIANTS, AttackConfig, ConfigError,
                                     LossWeights, load_yaml_config)
from tldr_core.attack.data import DATASETS, DataError, DatasetBundle, DatasetNotFoundError, load_dataset
from tldr_core.attack.images import parse_image_size
from tldr_core.attack.kkt import KKTConfig, run_kkt
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.templates import TemplateResult, applies as templates_apply
from tldr_core.attack.tldr import run_tldr
from tldr_core.attack.train import NonFiniteLossError, resolve_device, summarize_history
from tldr_core.cli.attack_flags import (ATTACKS, add_kkt_flags, add_prior_flags, check_attack_flags,
                                        kkt_config_from_args)
from tldr_core.cli.output_folder import OutputError, StagedOutput
from tldr_core.paths import runs_dir
from tldr_core.platform import cli_flags as flags
from tldr_core.report.artifacts import checkpoint_name, write_artifacts
from tldr_core.report.page import render_report
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.pipeline import Scored, heldout_nearest, reference_index, score_attack, template_attack
from tldr_core.scoring.references import score_references
from tldr_core.scoring.risk import LEVELS, Risk, assess, worst

OUTPUT_FILES = ("metrics.json", "reconstructions.npz", "grid.png", "nearest.png", "exposure.csv", "exposure.png",
                "generator.pt", "report.html")
FAIL_STATUS = 3  # exit status when the verdict is at or above --fail-on
#: What --overwrite may replace: the files any audit writes (".partial": older versions' staging folder).
OUTPUT_NAMES = frozenset({*OUTPUT_FILES, *(checkpoint_name(k) for k in ATTACKS), ".partial"})


def output_files(kind: str = "tldr") -> tuple[str, ...]:
    """The files an audit with attack ``kind`` leaves in --out (its checkpoint named by kind)."""
    return tuple(checkpoint_name(kind) if n == "generator.pt" else n for n in OUTPUT_FILES)


@dataclass
class AuditResults:
    """Everything an audit computes; the report and metrics.json only present it."""

    attack: Scored                        # the attack's reconstructions, scores, exposure and nearest training images
    baselines: dict[str, dict[str, float]]  # score_baselines' dict
    heldout: Scored                       # real unseen images beside their nearest training images
    templates: TemplateResult | None = None  # the weight-template attack, when the first layer is fully connected
    references: dict[str, Scored] = field(default_factory=dict)  # model-free references (scoring.references)

    def risks(self) -> dict[str, Risk]:
        """The risk rule's verdict per attack ("tldr" or "kkt", then "templates"), as the report states it."""
        out = {self.attack.kind: assess(self.attack.metrics, self.baselines)}
        if self.templates is not None:
            out["templates"] = assess(self.templates.metrics, self.baselines)
        return out


def train_per_class(bundle: DatasetBundle) -> int:
    """Training images per class (the sets are class-balanced): what the KKT attacker is assumed to know."""
    return max(1, round(len(bundle.train) / bundle.num_classes))


def run_attack(classifier: nn.Module, bundle: DatasetBundle, cfg: AttackConfig | KKTConfig, *,
               log: Callable[[str], None] | None = print) -> AttackOutput:
    """TLDR (an AttackConfig) or the KKT attack (a KKTConfig) against ``classifier`` on ``bundle``'s shapes."""
    if isinstance(cfg, KKTConfig):
        return run_kkt(classifier, bundle.num_classes, tuple(bundle.image_shape), cfg,
                       train_per_class=train_per_class(bundle), log=log)
    return run_tldr(classifier, bundle.num_classes, tuple(bundle.image_shape), cfg, log=log)


def run_audit(classifier: nn.Module, bundle: DatasetBundle, cfg: AttackConfig | KKTConfig, *, tau: float = 0.5,
              log: Callable[[str], None] | None = print) -> AuditResults:
    """The attack (:func:`run_attack`, then scored with its exposure), the baselines (as many per class as
    the attack made), the weight-template attack when it applies, and the held-out comparison, all
    scored against ``bundle`` with seed ``cfg.seed``."""
    say = log or (lambda s: None)
    index = reference_index(bundle)
    out = run_attack(classifier, bundle, cfg, log=log)
    attack = score_attack(out, classifier, bundle, tau=tau, seed=cfg.seed, index=index)
    per_class = max(1, len(out.labels) // bundle.num_classes)
    say("scoring baselines (noise, class means, real held-out images) with the same code")
    baselines = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, per_class,
                                classifier=classifier, tau=tau, seed=cfg.seed)
    templates = (template_attack(classifier, bundle, tau=tau, seed=cfg.seed, index=index)
                 if templates_apply(classifier) else None)
    heldout = heldout_nearest(bundle, per_class, seed=cfg.seed, index=index)
    say("scoring the model-free references (class mean of T, class mean of P) with the same rule")
    references = score_references(classifier, bundle, tau=tau, seed=cfg.seed, index=index)
    return AuditResults(attack, baselines, heldout, templates, references)


def risk_fields(risk: Risk) -> dict[str, Any]:
    """One verdict as metrics.json records it."""
    return {"risk": risk.level, "reasons": list(risk.reasons), "criterion": risk.criterion,
            "thresholds": dict(risk.thresholds)}


def audit_record(bundle: DatasetBundle, res: AuditResults, classifier_info: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content (adds "template_attack" when the template attack ran). The verdict: the worst
    attack's risk_fields at the top level (and "risk_attack" naming it), every attack's under "risks"."""
    out = res.attack.out
    risks = res.risks()
    kinds = list(risks)
    top = kinds[worst([risks[k] for k in kinds])]
    run_key = "generator" if out.kind == "tldr" else out.kind  # the attack's own run: steps and speed
    record = {
        "attack": out.kind,
        "dataset": {"name": bundle.name, "source": bundle.source, "train_size": len(bundle.train),
                    "heldout_size": len(bundle.heldout), "test_size": len(bundle.test),
                    "population_size": len(bundle.test), "population": "the test split (disjoint from T and H')",
                    "image_shape": list(bundle.image_shape), "num_classes": bundle.num_classes},
        "classifier": classifier_info,
        "settings": out.settings,
        "metrics": res.attack.metrics,
        "baselines": res.baselines,
        "final_losses": summarize_history(out.history),
        run_key: {"steps": out.steps, "seconds": round(out.seconds, 2),
                  "steps_per_second": round(out.steps_per_second, 2)},
        **risk_fields(risks[top]),
        "risk_attack": top,
        "risks": {k: risk_fields(r) for k, r in risks.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if res.templates is not None:
        record["template_attack"] = res.templates.summary()
    record["references"] = {name: {**risk_fields(assess(r.metrics, res.baselines)), "metrics": r.metrics}
                            for name, r in res.references.items()}
    return record


def write_outputs(target: StagedOutput, bundle: DatasetBundle, res: AuditResults, classifier_info: dict[str, Any],
                  spec: dict[str, Any] | None = None) -> Path:
    """Write every artefact into ``target``'s staging folder (metrics.json last), then swap it in as --out."""
    stage = target.stage
    if stage is None:
        raise OutputError("the output folder is not open")
    write_artifacts(stage, bundle, res.attack, meta={"classifier": classifier_info.get("path")})
    record = audit_record(bundle, res, classifier_info)
    html = render_report(bundle, res.baselines, attack=res.attack, templates=res.templates, heldout=res.heldout,
                         spec=spec, record=record, references=res.references)
    (stage / "report.html").write_text(html, encoding="utf-8")
    (stage / "metrics.json").write_text(json.dumps(record, indent=2, default=float))
    return target.commit() / "metrics.json"


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
    d.add_argument("--classifier-epochs", type=int, default=ClassifierSettings.epochs,
                   help="epochs when training the classifier (2 with --smoke-test)")
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
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default runs/audit under the runs folder: $TLDR_RUNS, "
                   "else ./runs); must be empty or absent unless --overwrite")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an earlier audit's output in --out (swapped in only once the new one is complete)")
    o.add_argument("--tau", type=float, default=0.5, help="SSIM threshold for coverage (default 0.5)")
    o.add_argument("--smoke-test", action="store_true", help="tiny run (few steps, small sets) to check the set-up")
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--fail-on", choices=("medium", "high"), default=None,
                   help=f"after writing everything, exit with status {FAIL_STATUS} when the verdict (the worst "
                        "attack's risk level) is at or above this level: a gate for CI or a model registry "
                        "(default: none, the exit status ignores the verdict)")
    flags.add_tracking_uri(o, optional_value=True)
    return p


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


def load_audited_classifier(args: argparse.Namespace, bundle: DatasetBundle, device: str,
                            log: Callable[[str], None], mlflow_uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    if args.classifier:
        if args.classifier.startswith("models:/"):  # a registered version, read weights-only from mlflow_uri
            from tldr_core.platform.tracking.audit_run import load_registered

            model, meta = load_registered(mlflow_uri, args.classifier)
        else:
            model, meta = load_classifier(args.classifier)
        spec = model.spec()
        if tuple(spec["in_shape"]) != tuple(bundle.image_shape) or spec["num_classes"] != bundle.num_classes:
            raise CheckpointError(f"{args.classifier} expects inputs {tuple(spec['in_shape'])} with "
                                  f"{spec['num_classes']} classes, but {bundle.name} has {tuple(bundle.image_shape)} "
                                  f"with {bundle.num_classes}")
        from tldr_core.attack.classifier import accuracy
        meta = {**meta, "path": str(meta.get("path", args.classifier)),
                "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels)}
        return model, meta
    epochs = 2 if args.smoke_test else args.classifier_epochs
    settings = ClassifierSettings(arch=args.arch, epochs=epochs, seed=args.data_seed)
    model, meta, path = load_or_train(bundle, settings, device=device, log=log)
    return model, {**meta, "path": str(path)}


def describe_attack(cfg: AttackConfig | KKTConfig, device: str) -> str:
    if isinstance(cfg, KKTConfig):
        return (f"attack: KKT candidates, {cfg.steps} steps on {device}, layers {cfg.layers}, "
                f"{cfg.per_class or 'auto'} per class")
    return (f"attack: {cfg.variant} generator, {cfg.mode} mode, {cfg.steps} steps on {device}; "
            f"weights {cfg.effective_weights.as_dict()}")


def summary_lines(res: AuditResults, tau: float) -> list[str]:
    """What the terminal shows at the end: the scores, exposure and the verdict."""
    m, b = res.attack.metrics, res.baselines
    lines = [f"\nquality {m['quality']:.3f} (noise {b['noise']['quality']:.3f}, class means "
             f"{b['class_mean']['quality']:.3f}, real held-out {b['heldout_real']['quality']:.3f})",
             f"memorisation gap {m['gap']:+.4f} [95% CI {m['gap_ci_low']:+.4f}, {m['gap_ci_high']:+.4f}]  "
             f"coverage@{tau} {m['coverage']:.3f}  label agreement {m['label_agreement']:.2f}  "
             f"diversity {m['diversity']:.3f}"]
    if "exposure_auc" in m:
        lines.append(f"calibrated exposure AUC {m['exposure_auc']:.3f} [{m['exposure_auc_lo']:.3f}, "
                     f"{m['exposure_auc_hi']:.3f}]  TPR@{m['exposure_fpr']:.0%}FPR {m['exposure_tpr']:.3f} "
                     f"[{m['exposure_tpr_lo']:.3f}, {m['exposure_tpr_hi']:.3f}]  exposed {m['exposed_count']:.0f} "
                     f"(about {m['exposed_by_chance']:.0f} by chance; {m['exposed_distinct']:.0f} with a "
                     f"reconstruction of their own; population {m['population_size']:.0f} images)")
        lines.append(f"raw exposure AUC {m['raw_exposure_auc']:.3f}  TPR {m['raw_exposure_tpr']:.3f} "
                     f"[{m['raw_exposure_tpr_lo']:.3f}, {m['raw_exposure_tpr_hi']:.3f}]  matched@0.6 "
                     f"{m['matched_train_060']:.0f} T / {m['matched_heldout_060']:.0f} H' (p {m['matched_p_060']:.2g})")
    lines += [f"risk ({kind}): {r.level}: {r.meaning}" for kind, r in res.risks().items()]
    return lines


def check_args(args: argparse.Namespace) -> tuple[AttackConfig | KKTConfig, tuple[int, int] | None, str]:
    """(attack settings, --image-size, device): every input check that needs no data, before --out is
    touched or anything is loaded."""
    cfg = config_from_args(args)
    if not 0 < args.tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {args.tau}")
    if args.classifier_epochs < 1:
        raise ConfigError(f"--classifier-epochs must be >= 1, got {args.classifier_epochs}")
    image_size = parse_image_size(args.image_size) if args.image_size is not None else None
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
    classifier, info = load_audited_classifier(args, bundle, device, log, mlflow_uri)
    log(describe_attack(cfg, device))
    res = run_audit(classifier, bundle, cfg, tau=args.tau, log=log)
    spec = classifier.spec() if hasattr(classifier, "spec") else None
    path = write_outputs(target, bundle, res, info, spec=spec)
    if mlflow_uri is not None:  # the first thing written to the store: after data, classifier and files
        from tldr_core.platform.tracking.audit_run import log_audit

        log_audit(mlflow_uri, path.parent, json.loads(path.read_text()), bundle, say=log)
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
    log(f"wrote {path.parent}/ ({', '.join(output_files(res.attack.kind))})")
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


def fail_on_status(res: AuditResults, fail_on: str | None) -> int:
    """0, or FAIL_STATUS (saying so on stderr) when the worst verdict is at or above ``fail_on``."""
    if fail_on is None:
        return 0
    risks = list(res.risks().values())
    level = risks[worst(risks)].level
    if LEVELS.index(level) < LEVELS.index(fail_on.upper()):
        return 0
    print(f"fail-on: the verdict {level} is at or above --fail-on {fail_on}: exit status {FAIL_STATUS}",
          file=sys.stderr, flush=True)
    return FAIL_STATUS


if __name__ == "__main__":
    sys.exit(main())
