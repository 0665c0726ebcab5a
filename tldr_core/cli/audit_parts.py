"""The audit command's pieces around the pipeline: the audited classifier, the membership stage's
reference models, the terminal summary and --fail-on (tldr_core.cli.audit is the command line).

The pipeline itself is :func:`tldr_core.scoring.audit.run_audit`; the files are written by
:func:`tldr_core.report.audit_files.write_audit_folder`; reference models for LiRA are trained as
parallel Ray tasks by :mod:`tldr_core.platform.references` (a local Ray unless --address names one).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from torch import nn

from tldr_core.attack.checkpoints import CheckpointError, load_classifier
from tldr_core.attack.classifier import ClassifierSettings, accuracy, load_or_train
from tldr_core.attack.config import AttackConfig, ConfigError
from tldr_core.attack.data import DatasetBundle
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.reference_models import settings_from_meta
from tldr_core.platform import cli_flags as flags
from tldr_core.scoring.audit import AuditResults, axis_levels, combined_sentence
from tldr_core.scoring.fail_on import AXES, failing, parse_fail_on  # noqa: F401 - parse_fail_on: the command's

Log = Callable[[str], None]
FAIL_STATUS = 3  # exit status when a verdict axis is at or above --fail-on


def load_audited_classifier(args: argparse.Namespace, bundle: DatasetBundle, device: str, log: Log,
                            mlflow_uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier under audit: --classifier (a file or models:/...), else trained here and cached."""
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
        meta = {**meta, "path": str(meta.get("path", args.classifier)),
                "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels)}
        return model, meta
    epochs = args.classifier_epochs or (2 if args.smoke_test else ClassifierSettings.epochs)  # explicit flags win
    settings = ClassifierSettings(arch=args.arch, epochs=epochs, seed=args.data_seed)
    model, meta, path = load_or_train(bundle, settings, device=device, log=log)
    return model, {**meta, "path": str(path)}


def reference_count(args: argparse.Namespace) -> int | None:
    """K reference models for LiRA (None: membership inference off; 0: loss and margin only)."""
    if args.no_membership:
        return None
    if args.membership_refs is not None:
        return args.membership_refs
    from tldr_core.platform.references import DEFAULT_K

    return 0 if args.smoke_test else DEFAULT_K


def check_membership_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--membership-refs and --ref-set checked before any work; the --ref-set overrides as a dict."""
    if args.membership_refs is not None and (args.membership_refs < 0 or args.membership_refs == 1):
        raise ConfigError(f"--membership-refs must be 0 (loss and margin only) or >= 2 (LiRA), got "
                          f"{args.membership_refs}")
    if args.membership_refs is not None and args.membership_refs > 256:
        raise ConfigError(f"--membership-refs {args.membership_refs} is more than the 256 reference models LiRA's "
                          "authors use; each is a full classifier training")
    out: dict[str, Any] = {}
    for kv in args.ref_set:
        name, sep, value = kv.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--ref-set expects NAME=VALUE, got {kv!r}")
        out[name.strip()] = flags.parse_value(value)
    unknown = sorted(set(out) - set(ClassifierSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"--ref-set: unknown classifier setting(s) {unknown}; known: "
                          f"{sorted(ClassifierSettings.__dataclass_fields__)}")
    return out


def membership_refs(args: argparse.Namespace, classifier: nn.Module, meta: dict[str, Any], bundle: DatasetBundle,
                    device: str, log: Log) -> list[nn.Module] | None:
    """The reference models membership inference uses (trained on Ray, cached): None when it is off, []
    for loss and margin only. Their training settings are the audited model's, from its checkpoint;
    fields it does not record must come from --ref-set."""
    k = reference_count(args)
    if not k:
        return None if k is None else []
    overrides = check_membership_flags(args)
    spec = classifier.spec() if hasattr(classifier, "spec") else None
    try:
        settings, unknown = settings_from_meta(meta, spec, overrides)
        why = (f"reference models must be trained like the audited classifier, but its checkpoint does not record "
               f"{', '.join(unknown)}") if unknown else ""
    except ValueError as exc:
        if args.membership_refs is not None:
            raise ConfigError(f"reference models: {exc}") from exc
        unknown, why = ["architecture"], f"reference models cannot be built like the audited classifier ({exc})"
    if unknown:
        if args.membership_refs is not None:  # asked for explicitly: say what is missing
            raise ConfigError(f"{why}: give them with --ref-set NAME=VALUE, or run --membership-refs 0 (loss and "
                              f"margin attacks only)")
        log(f"membership: {why}; running the loss and margin attacks only (give them with --ref-set NAME=VALUE "
            f"for LiRA)")
        return []
    from tldr_core.platform.references import MembershipStageError, train_references

    try:
        refs = train_references(bundle, settings, k, address=args.address, log=log,
                                gpus_per_task=1.0 if device.startswith("cuda") else 0.0)
    except (MembershipStageError, ValueError) as exc:
        raise ConfigError(f"reference models: {exc}") from exc
    return [r.model for r in refs]


def describe_attack(cfg: AttackConfig | KKTConfig, device: str) -> str:
    if isinstance(cfg, KKTConfig):
        return (f"attack: KKT candidates, {cfg.steps} steps on {device}, layers {cfg.layers}, "
                f"{cfg.per_class or 'auto'} per class")
    return (f"attack: {cfg.variant} generator, {cfg.mode} mode, {cfg.steps} steps on {device}; "
            f"weights {cfg.effective_weights.as_dict()}")


def summary_lines(res: AuditResults, tau: float) -> list[str]:
    """What the terminal shows at the end: the scores, exposure, membership and the two-axis verdict."""
    m, b = res.attack.metrics, res.baselines
    lines = [f"\nquality {m['quality']:.3f} (noise {b['noise']['quality']:.3f}, class means "
             f"{b['class_mean']['quality']:.3f}, real held-out {b['heldout_real']['quality']:.3f})",
             f"memorisation gap {m['gap']:+.4f} [95% CI {m['gap_ci_low']:+.4f}, {m['gap_ci_high']:+.4f}]  "
             f"coverage@{tau} {m['coverage']:.3f}  label agreement {m['label_agreement']:.2f}  "
             f"diversity {m['diversity']:.3f}",
             f"calibrated exposure AUC {m['exposure_auc']:.3f} [{m['exposure_auc_lo']:.3f}, {m['exposure_auc_hi']:.3f}]"
             f"  TPR@{m['exposure_fpr']:.0%}FPR {m['exposure_tpr']:.3f} [{m['exposure_tpr_lo']:.3f}, "
             f"{m['exposure_tpr_hi']:.3f}]  exposed {m['exposed_count']:.0f} (about {m['exposed_by_chance']:.0f} by "
             f"chance; {m['exposed_distinct']:.0f} with a reconstruction of their own; population "
             f"{m['population_size']:.0f} images)",
             f"raw exposure AUC {m['raw_exposure_auc']:.3f}  TPR {m['raw_exposure_tpr']:.3f} "
             f"[{m['raw_exposure_tpr_lo']:.3f}, {m['raw_exposure_tpr_hi']:.3f}]  matched@0.6 "
             f"{m['matched_train_060']:.0f} T / {m['matched_heldout_060']:.0f} H' (p {m['matched_p_060']:.2g})"]
    lines += [f"risk ({kind}): {r.level}: {r.meaning}" for kind, r in res.risks().items()]
    mrisk = res.membership_risk()
    if mrisk is not None:
        lines.append(f"membership: {mrisk.level}: {mrisk.reason}")
    if res.stationarity is not None:
        lines.append(res.stationarity.sentence())
    lines.append("verdict: " + combined_sentence(res.reconstruction_risk()[1], mrisk))
    return lines


def fail_on_status(res: AuditResults, fail_on: list[tuple[str, str]]) -> int:
    """0, or FAIL_STATUS (saying which axis on stderr) when an axis is at or above its --fail-on level."""
    for name, level, _bar, gate in failing(axis_levels(res), fail_on)[:1]:
        label = "verdict" if name == "reconstruction" else f"{name} verdict"
        print(f"fail-on: the {label} {level} is at or above --fail-on {gate}: exit status {FAIL_STATUS}",
              file=sys.stderr, flush=True)
        return FAIL_STATUS
    return 0
