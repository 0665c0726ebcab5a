"""Every attack on every control classifier, one table: does the verdict say HIGH where it should?

    python -m tldr_core.cli.controls                              # all controls x all attacks
    python -m tldr_core.cli.controls --controls leaky-fc,clean --attacks kkt --kkt-steps 3000
    python -m tldr_core.cli.controls --smoke-test                 # shrunk controls, seconds

The controls (tldr_core.attack.zoo) are classifiers whose leakage is known by construction, each
with the verdict expected of it written down before any run. For each (control, attack) the attack
runs against the cached control classifier, is scored with the audit's pipeline (quality, gap,
exposure) and judged by the audit's risk rule; its files go to ``<out>/<control>/<attack>/``
(reconstructions.npz, grid.png, nearest.png, exposure.csv, exposure.png, a checkpoint) and one row
to ``<out>/controls.json`` (rewritten after every cell, so an interrupted run keeps what it
finished) and ``<out>/controls.md`` (the table docs/controls.md is copied from). ``--out`` has the
audit's guarantees but is written in place (cli/output_folder.py, InPlaceOutput): a used folder is
refused unless ``--overwrite``, a second run into it is refused while one runs. ``--smoke-test``
shrinks what is not given: flags given explicitly keep their values.

Attacks: ``tldr`` (the generator, default loss weights), ``templates`` (weight templates, only
where the first layer is fully connected), ``kkt`` (stationarity reconstruction). On a control
with canaries the rows also say how exposed exactly the canary images are.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn

from tldr_core.attack.bounds import check_kkt_candidates
from tldr_core.attack.checkpoints import CheckpointError
from tldr_core.attack.classifier import load_or_train
from tldr_core.attack.config import AttackConfig, ConfigError
from tldr_core.attack.data import DataError, DatasetBundle, DatasetNotFoundError, load_dataset
from tldr_core.attack.kkt import KKTConfig, run_kkt
from tldr_core.attack.kkt_resume import load_resume
from tldr_core.attack.templates import applies as templates_apply
from tldr_core.attack.train import NonFiniteLossError, resolve_device
from tldr_core.attack.zoo import CONTROLS, Control, control_bundles
from tldr_core.cli.attack_flags import KKT_RESUME_HELP
from tldr_core.cli.output_folder import InPlaceOutput, OutputError
from tldr_core.paths import runs_dir
from tldr_core.platform import cli_flags as flags
from tldr_core.platform.references import DEFAULT_K, train_references
from tldr_core.report.artifacts import write_artifacts
from tldr_core.report.controls import render_controls
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.pipeline import Scored, attack_and_score, score_attack, template_attack
from tldr_core.scoring.membership_risk import assess_membership
from tldr_core.scoring.mia import score_membership
from tldr_core.scoring.references import REFERENCES, score_references, within_bound
from tldr_core.scoring.risk import assess
from tldr_core.scoring.stationarity import StationarityError, stationarity

ATTACKS = ("tldr", "templates", "kkt")
Log = Callable[[str], None]


def shrink(control: Control) -> Control:
    """The control at smoke-test size: 8x8 digits, a few epochs; the same kind of model and data."""
    s = control.settings
    small = replace(s, epochs=min(s.epochs, 300 if control.leaky else 5), hidden=min(s.hidden, 64))
    return replace(control, settings=small, train_size=min(control.train_size, 100 if control.leaky else 300),
                   copies=min(control.copies, 3))


def prepare(control: Control, data: DatasetBundle, device: str, log: Log
            ) -> tuple[nn.Module, DatasetBundle, dict[str, Any], Any]:
    """(the control classifier, the bundle attacks are scored against, its meta, canary indices)."""
    trained_on, scored, canaries = control_bundles(control, data)
    model, meta, path = load_or_train(trained_on, control.settings, device=device, log=log)
    meta = {**meta, "path": str(path), **control_stationarity(model, trained_on, meta, log)}
    return model, scored, meta, canaries


#: The classifier's fields each row carries: accuracies, training cost, the stationarity diagnostic.
CLASSIFIER_FIELDS = ("train_accuracy", "test_accuracy", "train_size", "path", "train_seconds", "train_epochs",
                     "train_stop", "polish_steps", "stationarity_residual", "stationarity_form", "stationarity",
                     "stationarity_sentence")


def control_stationarity(model: nn.Module, trained_on: DatasetBundle, meta: dict[str, Any], log: Log
                         ) -> dict[str, Any]:
    """The stationarity diagnostic (scoring.stationarity) on the images the control was trained on: its
    residual, form, metrics and sentence for the rows; {} when it cannot be computed (the reason logged)."""
    try:
        res = stationarity(model, trained_on.train, meta)
    except StationarityError as exc:
        log(f"stationarity: not computed ({exc})")
        return {}
    log(f"stationarity: {res.sentence()}")
    return {"stationarity_residual": res.residual, "stationarity_form": res.form, "stationarity": res.metrics(),
            "stationarity_sentence": res.sentence()}


def kkt_config(args: argparse.Namespace, **extra: Any) -> KKTConfig:
    """The KKT settings of the flags (--kkt NAME=VALUE, --kkt-steps, and --kkt-per-class over --kkt per_class=)."""
    return KKTConfig.from_flat({**args.kkt, "steps": args.kkt_steps,
                                "per_class": args.kkt_per_class or args.kkt.get("per_class"), **extra})


def run_attack(attack: str, model: nn.Module, bundle: DatasetBundle, args: argparse.Namespace, log: Log
               ) -> Scored | Any | None:
    """One attack, scored; None when it does not apply to this model (templates on a CNN)."""
    device = str(resolve_device(args.device))
    if attack == "tldr":
        cfg = AttackConfig(steps=args.tldr_steps, per_class=args.per_class, seed=args.seed, device=device)
        return attack_and_score(model, bundle, cfg, log=log, log_every=max(1, args.tldr_steps // 6))
    if attack == "templates":
        return template_attack(model, bundle, seed=args.seed) if templates_apply(model) else None
    if attack == "kkt":
        cfg = kkt_config(args, seed=args.seed, device=device, log_every=max(1, args.kkt_steps // 6))
        out = run_kkt(model, bundle.num_classes, bundle.image_shape, cfg, train_per_class=bundle.train_per_class(),
                      log=log, resume=getattr(args, "kkt_state", None))
        return score_attack(out, model, bundle, seed=args.seed)
    raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


def canary_stats(res: Any, canaries: Any) -> dict[str, Any]:
    """How exposed exactly the canary images are: their e(t), how many are above the threshold, and
    their rank among all training images (1 = the most exposed)."""
    exp = res.exposure
    if exp is None or canaries.numel() == 0:
        return {}
    order = exp.e_train.argsort(descending=True).argsort() + 1
    return {"canaries": int(canaries.numel()),
            "canary_exposure": [round(float(v), 4) for v in exp.e_train[canaries]],
            "canaries_exposed": int((exp.e_train[canaries] > exp.threshold).sum()),
            "canary_ranks": [int(r) for r in order[canaries]]}


def cell(control: Control, attack: str, res: Any, baselines: dict, meta: dict, canaries: Any,
         seconds: float) -> dict[str, Any]:
    """One row of the table: the scores, the verdict and whether it matches the expected one. A model-free
    reference (scoring.references) is expected at most its bound (class mean of T: MEDIUM; of P: LOW)."""
    risk = assess(res.metrics, baselines)
    if attack in REFERENCES:
        bound = REFERENCES[attack][1]
        expected, as_expected = ("LOW" if bound == "LOW" else f"at most {bound}"), within_bound(attack, risk.level)
    else:
        expected, as_expected = control.expected, (risk.level != "LOW") == control.leaky
    return {"control": control.name, "attack": attack, "expected": expected, "reference": attack in REFERENCES,
            "why": control.why, "risk": risk.level, "criterion": risk.criterion, "reasons": risk.reasons,
            "as_expected": as_expected, "metrics": res.metrics,
            "classifier": {k: meta.get(k) for k in CLASSIFIER_FIELDS},
            "steps": int(getattr(res, "steps", 0)), "seconds": round(seconds, 1), **canary_stats(res, canaries)}


def reference_rows(control: Control, model: nn.Module, bundle: DatasetBundle, baselines: dict, meta: dict,
                   canaries: Any, seed: int) -> list[dict[str, Any]]:
    """The model-free reference rows (class mean of T, class mean of P), judged by the same rule."""
    return [cell(control, name, res, baselines, meta, canaries, 0.0)
            for name, res in score_references(model, bundle, seed=seed).items()]


def run_control(control: Control, data: DatasetBundle, args: argparse.Namespace, out: Path, log: Log
                ) -> list[dict[str, Any]]:
    model, bundle, meta, canaries = prepare(control, data, str(resolve_device(args.device)), log)
    log(f"{control.name}: train accuracy {meta['train_accuracy']:.3f}, test accuracy {meta['test_accuracy']:.3f}")
    baselines = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, args.per_class,
                                classifier=model, seed=args.seed)
    membership = control_membership(control, model, bundle, meta, canaries, args, log)
    rows = reference_rows(control, model, bundle, baselines, meta, canaries, args.seed)
    for attack in args.attacks:
        t0 = time.time()
        log(f"{control.name} x {attack}: running")
        res = run_attack(attack, model, bundle, args, log=lambda m: log("    " + m))
        seconds = time.time() - t0
        if res is None:
            log(f"{control.name} x {attack}: does not apply (first layer is not fully connected)")
            continue
        if isinstance(res, Scored):
            write_artifacts(out / control.name / attack, bundle, res, meta={"control": control.name})
        rows.append(cell(control, attack, res, baselines, meta, canaries, seconds))
        m = res.metrics
        log(f"{control.name} x {attack}: {rows[-1]['risk']} (expected {control.expected}); calibrated TPR@1%FPR "
            f"{m['exposure_tpr']:.2f} [{m['exposure_tpr_lo']:.2f}, {m['exposure_tpr_hi']:.2f}] (raw "
            f"{m['raw_exposure_tpr']:.2f}), AUC {m['exposure_auc']:.2f}, gap {m['gap']:+.3f}, matched@0.6 "
            f"{m['matched_train_060']:.0f} vs {m['matched_heldout_060']:.0f} ({rows[-1]['seconds']:.0f}s)")
    return [{**r, **membership} for r in rows]


def control_membership(control: Control, model: nn.Module, bundle: DatasetBundle, meta: dict[str, Any],
                       canaries: Any, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The control's membership axis (scoring.mia, scoring.membership_risk) for its rows: LiRA with
    --membership-refs reference models (Ray tasks, cached) when their training fits --membership-budget,
    else the margin attack alone (the row says why); the canaries' membership ranks within T."""
    if args.no_membership:
        return {}
    k = args.membership_refs
    cost = float(meta.get("train_seconds") or 0.0) * k / max(1, os.cpu_count() or 1)
    note = ""
    if k and cost > args.membership_budget:
        note = (f"LiRA skipped: {k} reference models would take about {cost:.0f} s (> --membership-budget "
                f"{args.membership_budget:.0f} s); margin attack only")
        log(f"{control.name}: membership: {note}")
        k = 0
    refs = train_references(bundle, control.settings, k, log=log) if k else []
    res = score_membership(model, bundle.train, bundle.heldout, references=[r.model for r in refs], seed=args.seed)
    risk = assess_membership(res.metrics())
    log(f"{control.name}: membership {risk.level} ({res.best}): {risk.reason}")
    out = {"membership": {"risk": risk.level, "criterion": risk.criterion, "reasons": risk.reasons,
                          "attack": res.best, "reference_models": k, "note": note, "metrics": res.metrics()}}
    if canaries.numel():
        out["canary_membership_ranks"] = [int(r) for r in res.ranks()[canaries]]
    return out


def kkt_overrides(pairs: list[str]) -> dict[str, Any]:
    """["lr=0.03", "alpha=150"] -> {"lr": 0.03, "alpha": 150}, validated by KKTConfig."""
    vals = {}
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"expected NAME=VALUE, got {kv!r}")
        name, value = kv.split("=", 1)
        vals[name.strip()] = flags.parse_value(value)
    KKTConfig.from_flat(vals)  # unknown names and bad values are errors here, before any training
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("python -m tldr_core.cli.controls", __doc__)  # shows every default
    p.add_argument("--controls", default=",".join(CONTROLS), help=f"comma list of {', '.join(CONTROLS)}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    p.add_argument("--dataset", default="mnist-bundled", help="data set the controls are built from")
    flags.add_data_root(p)
    p.add_argument("--out", default=None, help="output folder (default runs/controls under the runs folder); must "
                   "be empty or absent unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier controls output in --out (it is put back if the run writes nothing)")
    p.add_argument("--tldr-steps", type=int, default=AttackConfig.steps, help="generator steps (default 1200)")
    p.add_argument("--per-class", type=int, default=20, help="TLDR reconstructions per class (default 20)")
    p.add_argument("--kkt-steps", type=int, default=KKTConfig.steps, help="KKT steps")
    p.add_argument("--kkt-per-class", type=int, default=None,
                   help="KKT candidates per class (default 2 x the training images per class)")
    p.add_argument("--kkt-set", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a KKT setting ({', '.join(KKTConfig.names())}); repeatable (default: none, KKTConfig's)")
    p.add_argument("--kkt-resume", default=None, metavar="PATH",
                   help=KKT_RESUME_HELP + "; with one control and --attacks including kkt")
    p.add_argument("--membership-refs", type=int, default=DEFAULT_K, metavar="K",
                   help="reference models for each control's LiRA (Ray tasks, cached); 0: margin attack only")
    p.add_argument("--membership-budget", type=float, default=1800.0, metavar="SECONDS",
                   help="skip LiRA (margin attack only) on a control whose K references would take longer than this "
                        "on this machine's cores, from its own recorded training time")
    p.add_argument("--no-membership", action="store_true", help="no membership axis in the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks")
    flags.add_device(p)
    p.add_argument("--smoke-test", action="store_true", help="shrunk controls on 8x8 digits, a few steps")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [c for c in args.controls if c not in CONTROLS] + [a for a in args.attacks if a not in ATTACKS]
    if bad or not args.controls or not args.attacks:
        p.error(f"unknown or missing control/attack {bad}; controls: {', '.join(CONTROLS)}; attacks: {', '.join(ATTACKS)}")
    try:
        args.kkt = kkt_overrides(args.kkt_set)
    except (ValueError, TypeError) as exc:
        p.error(f"--kkt-set: {exc}")
    if args.smoke_test:  # shrinks only what was not given: an explicit flag is never replaced silently
        given = _given_flags(argv)
        for dest, value in SMOKE.items():
            if dest not in given:
                setattr(args, dest, value)
    return args


#: What --smoke-test sets when the flag is not given (with data_root: digits-8x8 needs none).
SMOKE = {"dataset": "digits-8x8", "data_root": None, "tldr_steps": 20, "kkt_steps": 30, "per_class": 4,
         "membership_refs": 0}
#: What --overwrite may replace: the files and folders a controls run writes (".partial": a table being written).
OUTPUT_NAMES = frozenset({"controls.json", "controls.md", ".controls.json.partial", ".controls.md.partial",
                          *CONTROLS})


def _given_flags(argv: list[str] | None) -> set[str]:
    """The dests given on the command line (the parser again, every default suppressed)."""
    q = build_parser()
    for action in q._actions:  # noqa: SLF001 - argparse has no public way to ask what was given
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


def check_args(args: argparse.Namespace) -> None:
    """The value checks that need no data (ConfigError), before --out is touched or anything is loaded."""
    for name in ("tldr_steps", "per_class", "kkt_steps", "kkt_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # 0 would read as "not given"
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    kkt_config(args)
    args.kkt_state = None
    if args.kkt_resume is not None:  # one run continues: one control's kkt cell
        if len(args.controls) != 1 or "kkt" not in args.attacks:
            raise ConfigError("--kkt-resume continues one KKT run: give exactly one --controls and kkt in --attacks")
        args.kkt_state = load_resume(args.kkt_resume)


def check_kkt_bound(control: Control, data: DatasetBundle, args: argparse.Namespace) -> None:
    """The KKT candidates asked for, against this control's data, before its classifier is trained."""
    if "kkt" not in args.attacks:
        return
    scored = control_bundles(control, data)[1]
    per = scored.train_per_class()
    check_kkt_candidates(kkt_config(args).candidates_per_class(per), per, scored.num_classes, tuple(scored.image_shape))


def _write_text(path: Path, text: str) -> None:
    """Written beside and renamed: a kill never leaves a half-written table."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def run_controls(args: argparse.Namespace, out: Path, log: Log) -> list[dict[str, Any]]:
    """Every (control, attack) cell into ``out``; the tables rewritten after every control."""
    rows: list[dict[str, Any]] = []
    for name in args.controls:
        control = shrink(CONTROLS[name]) if args.smoke_test else CONTROLS[name]
        data = load_dataset(args.dataset, control.train_size, seed=0, data_root=args.data_root)
        check_kkt_bound(control, data, args)
        rows += run_control(control, data, args, out, log=log)
        meta = {"dataset": args.dataset, "data_root": args.data_root, "smoke_test": args.smoke_test,
                "seed": args.seed, "tldr_steps": args.tldr_steps, "kkt_steps": args.kkt_steps,
                "kkt": args.kkt, "controls": {c: asdict(CONTROLS[c]) for c in args.controls}}
        _write_text(out / "controls.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        _write_text(out / "controls.md", render_controls(rows, meta))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    target = InPlaceOutput(args.out or runs_dir() / "controls", overwrite=args.overwrite, names=OUTPUT_NAMES,
                           tool="controls run")
    try:
        check_args(args)
        with target:
            rows = run_controls(args, target.out, log=lambda s: print(s, flush=True))
            target.commit()
    except (ConfigError, DataError, DatasetNotFoundError, CheckpointError, NonFiniteLossError, OutputError,
            RuntimeError, OSError, MemoryError) as exc:
        return flags.print_error(exc)  # one line; cells finished before it stay in --out
    except KeyboardInterrupt:
        print(f"error: interrupted; the cells finished so far are in {target.out}", file=sys.stderr)
        return 130
    out = target.out
    wrong = [f"{r['control']} x {r['attack']}" for r in rows if r["as_expected"] is False]
    print(f"wrote {out / 'controls.md'}; {len(rows)} cells, {len(wrong)} not as expected"
          + (f": {', '.join(wrong)}" if wrong else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
