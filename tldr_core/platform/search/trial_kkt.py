"""A KKT trial of the search (`--attack kkt`): the stationarity reconstruction attack
(`tldr_core.attack.kkt.run_kkt`) with the settings Optuna drew, adapted to Ray Tune the way the TLDR
trial adapts `train_generator` (`trial._progress_callback`).

`run_kkt` calls its callback as `callback(step, record, candidates)` at every logged step
(`log_every`, which divides `eval_every`, the first and the last step); every `eval_every` steps the
trial scores *all* current candidates (`candidates.x` clamped to [0, 1], their fixed labels) with
`pipeline.score_images` and reports them (`trial_inputs.report_progress`): the same images the final score
uses, so ASHA compares the quantity the search maximises. Before each report it saves them as the run
artifact `candidates/evaluated.npz`: a trial ASHA stops there still leaves candidates for the search's
pooled result (`pooled`). The final scoring, artifacts and the
candidates' checkpoint (`kkt.pt`, weights-only) are `trial._finish`'s.
"""
from __future__ import annotations

import copy
import os
from typing import Any

from tldr_core.platform.search.trial_inputs import (TrialInputs, report_progress, run_params, trial_classifier,
                                                    trial_device)
from tldr_core.platform.tracking.trial_runs import TrialRun


def prepare_kkt(config: dict[str, Any], inputs: TrialInputs, run: TrialRun, trial_id: str):
    """(KKTConfig of this trial, frozen classifier, train_per_class); the settings go to the run's params,
    per_class as resolved (None in the config means 2 x train_per_class)."""
    from tldr_core.attack.kkt import KKTConfig

    s = inputs.settings
    base = KKTConfig(steps=int(s["steps"]), seed=int(s["seed"]), device=trial_device(inputs),
                     log_every=int(s["log_every"]))
    cfg = inputs.space.attack_config(config, base=base)
    tpc = inputs.bundle.train_per_class()
    run.log_params({**cfg.flat(), "per_class": cfg.candidates_per_class(tpc), "train_per_class": tpc,
                    **run_params(inputs, trial_id)})
    return cfg, trial_classifier(inputs), tpc


def save_evaluated(run: TrialRun, images, labels, step: int) -> None:
    """The candidates about to be reported, as the run artifact `pooled.EVALUATED_NPZ` (rewritten at each
    evaluation): what the search pools from a trial ASHA stops inside that report (`pooled`)."""
    import tempfile
    from pathlib import Path

    from tldr_core.platform.search.pooled import EVALUATED_NPZ, save_candidates

    folder, name = EVALUATED_NPZ.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="kkt-eval-", dir=os.environ.get("TMPDIR") or None) as tmp:
        run.log_artifact(save_candidates(Path(tmp) / name, images, labels, step), folder)


def kkt_progress_callback(inputs: TrialInputs, run: TrialRun, cfg, scorer, state: dict[str, Any]):
    """run_kkt's callback: record the losses; every eval_every steps (not the last: `_finish` scores it)
    score the candidates and report. Never stops the attack itself (ASHA does, inside tune.report)."""
    eval_every = int(inputs.settings["eval_every"])

    def callback(step: int, record: dict[str, float], cand) -> bool:
        state["pending"].append(record)
        state["last"].update(record)
        if step % eval_every == 0 and step < cfg.steps:
            images, labels = cand.x.detach().clamp(0, 1).float().cpu(), cand.labels.detach().cpu()
            save_evaluated(run, images, labels, step)
            report_progress(inputs, run, state, step, record, images, labels, scorer, cfg.seed)
        return False

    return callback


def run_kkt_trial(config: dict[str, Any], inputs: TrialInputs, run: TrialRun, trial_id: str,
                  state: dict[str, Any]):
    """Optimise the trial's candidates; returns (AttackOutput, KKTConfig, classifier)."""
    from tldr_core.attack.kkt import run_kkt

    cfg, classifier, tpc = prepare_kkt(config, inputs, run, trial_id)
    # score with a CPU copy: the attacked classifier stays where run_kkt put it, ReLUs swapped
    scorer = copy.deepcopy(classifier).cpu()
    callback = kkt_progress_callback(inputs, run, cfg, scorer, state)
    attack = run_kkt(classifier, inputs.bundle.num_classes, tuple(inputs.bundle.image_shape), cfg,
                     train_per_class=tpc, callback=callback, log=None)
    return attack, cfg, classifier
