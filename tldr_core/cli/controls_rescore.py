"""Re-judge a finished controls run with the current scoring and rule, without running an attack again.

    python -m tldr_core.cli.controls_rescore runs/controls            # rewrites controls.json / controls.md there
    python -m tldr_core.cli.controls_rescore runs/cifar --data-root ../shared/data/cifar10-dev.npz

A controls run keeps every attack's reconstructions (``<run>/<control>/<attack>/reconstructions.npz``)
and every control classifier is cached, so a change in how reconstructions are scored or judged
(the calibrated exposure, the gap's permutation test, a rule's threshold) can be applied to the cells a
run already paid for: each saved cell is scored again (tldr_core.scoring.pipeline.score_attack, its
exposure.csv and exposure.png rewritten), the weight templates and the model-free references are
recomputed (they cost seconds), the membership axis is judged again from the metrics the run recorded,
and the tables are rewritten. Steps, seconds and classifier fields stay as the run measured them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tldr_core.attack.checkpoints import CheckpointError, load_classifier
from tldr_core.attack.data import DataError, DatasetNotFoundError, load_dataset
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.templates import applies as templates_apply
from tldr_core.attack.zoo import CONTROLS, control_bundles
from tldr_core.cli.controls import _write_text, cell, shrink
from tldr_core.platform import cli_flags as flags
from tldr_core.report.artifacts import write_artifacts
from tldr_core.report.controls import render_controls
from tldr_core.scoring.membership_risk import assess_membership
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.pipeline import score_attack, template_attack
from tldr_core.scoring.references import REFERENCES, score_references

Row = dict[str, Any]


def _membership(row: Row) -> Row:
    """The row's membership axis judged again from the metrics the run recorded."""
    mb = row.get("membership")
    if not mb:
        return {}
    risk = assess_membership(mb["metrics"])
    return {"membership": {**mb, "risk": risk.level, "criterion": risk.criterion, "reasons": risk.reasons}}


def _saved(folder: Path, kind: str) -> AttackOutput | None:
    path = folder / "reconstructions.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return AttackOutput(kind, torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]))


def rescore_control(name: str, old: list[Row], run: Path, meta: dict[str, Any], data_root: str | None,
                    log: Any) -> list[Row]:
    """Every row of one control again, in the run's order."""
    control = shrink(CONTROLS[name]) if meta.get("smoke_test") else CONTROLS[name]
    data = load_dataset(meta["dataset"], control.train_size, seed=0, data_root=data_root or meta.get("data_root"))
    _, bundle, canaries = control_bundles(control, data)
    model, _ = load_classifier(old[0]["classifier"]["path"])
    seed = int(meta.get("seed", 0))
    baselines = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, 20, classifier=model,
                                seed=seed)
    refs = score_references(model, bundle, seed=seed)
    clf_meta = dict(old[0]["classifier"])
    out = []
    for row in old:
        attack = row["attack"]
        if attack in REFERENCES:
            res = refs[attack]
        elif attack == "templates":
            res = template_attack(model, bundle, seed=seed) if templates_apply(model) else None
        else:
            saved = _saved(run / name / attack, attack)
            if saved is None:
                log(f"{name} x {attack}: no reconstructions.npz, kept as the run judged it")
                out.append(row)
                continue
            res = score_attack(saved, model, bundle, seed=seed)
            write_artifacts(run / name / attack, bundle, res, checkpoint=False, meta={"control": name})
        new = cell(control, attack, res, baselines, clf_meta, canaries, row["seconds"])
        new.update(steps=row.get("steps", 0), **{k: v for k, v in row.items() if k.startswith("canary_membership")},
                   **_membership(row))
        log(f"{name} x {attack}: {row['risk']} ({row['criterion']}) -> {new['risk']} ({new['criterion']})")
        out.append(new)
    return out


def read_run(run: Path) -> dict[str, Any]:
    """The run's controls.json ({"meta", "rows"}); ValueError naming the file when it is not one."""
    path = run / "controls.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give the folder a controls run wrote (tldr controls --out)")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or \
                not isinstance(record.get("meta"), dict) or "dataset" not in record["meta"]:
            raise ValueError("no 'meta' with a dataset and 'rows' list")
    except ValueError as exc:  # json's JSONDecodeError is one
        raise ValueError(f"{path} is not a controls run's table ({exc})") from exc
    return record


def main(argv: list[str] | None = None) -> int:
    p = flags.parser("python -m tldr_core.cli.controls_rescore", __doc__)
    p.add_argument("run", help="a controls run's folder (holding controls.json)")
    flags.add_data_root(p)
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        record = read_run(run)
        rows: list[Row] = []
        names = list(dict.fromkeys(r["control"] for r in record["rows"]))
        for name in names:
            rows += rescore_control(name, [r for r in record["rows"] if r["control"] == name], run, record["meta"],
                                    args.data_root, log=print)
        _write_text(run / "controls.json", json.dumps({"meta": record["meta"], "rows": rows}, indent=2, default=str))
        _write_text(run / "controls.md", render_controls(rows, record["meta"]))
    except (OSError, KeyError, ValueError, DataError, DatasetNotFoundError, CheckpointError) as exc:
        return flags.print_error(exc)
    print(f"rewrote {run / 'controls.md'}; {len(rows)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
