"""The Ray Tune side of the search (`driver`): the trial function, `run_trial` (the driver's callback
that ends what a trial cannot end itself is `trial_status.MlflowTrialStatus`; what every trial is
given and the steps both attacks' trials share are `trial_inputs`').

This module is imported by Ray workers, so it lives in the package. Training code
(`tldr_core.attack.train`) never imports Ray; the trial adapts it through `train_generator`'s callback:
every `eval_every` generator steps the trial scores a few reconstructions (`pipeline.score_images`:
quality, gap, ..., and exposure), logs them to MLflow, then calls `tune.report` (where ASHA may stop
it). Everything a trial needs from MLflow is written before each report, and the run is ended before
the final report, because code after `tune.report()` may never run. A trial stopped inside
`tune.report()` leaves its run RUNNING: only the driver knows whether ASHA stopped it or the search
was interrupted (`trial_status`). MLflow names: `eval/<score>`, `Objective/<objective>`, `loss/...`,
`wloss/...`, `train/...` (`tracking.store`); the run's data sets (T, H', test) are logged as its inputs.

A search with `attack: kkt` runs the stationarity attack instead (`trial_kkt`, same reports, same
scoring); the final step (`_finish`) is shared: the TLDR generator is logged as a pyfunc model, the
KKT candidates as the checkpoint artifact `kkt.pt`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tldr_core.platform.search.spaces.specs import TRIAL_NUMBER
from tldr_core.platform.search.trial_inputs import (TrialInputs, loss_metrics, report_progress, run_params,
                                                    score_metrics, trial_classifier, trial_device)
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import FINAL, STEP, TrialRun


def _open_run(c, config: dict[str, Any], inputs: TrialInputs, ctx) -> tuple[TrialRun, int]:
    """The trial's nested MLflow run (a stale attempt of the same trial is replaced) and its number."""
    s = inputs.settings
    number = int(config.get(TRIAL_NUMBER, 0))
    attack = s.get("attack", "tldr")
    label = "kkt" if attack == "kkt" else inputs.space.attack_flat(config).get("variant", "default")
    run = TrialRun.start(c, inputs.experiment_id, inputs.search_run_id, ctx.get_trial_id(), number,
                         run_name=f"trial-{number:03d}-{label}",
                         tags={**inputs.run_tags, tr.OBJECTIVE: s["objective"], "tldr.dataset": s["dataset"],
                               tr.ATTACK: attack, "tldr.trial_name": ctx.get_trial_name()})
    if inputs.datasets:
        tr.retry(lambda: c.log_inputs(run.run_id, datasets=inputs.datasets))
    return run, number


def _prepare(config: dict[str, Any], inputs: TrialInputs, run: TrialRun, trial_id: str):
    """(AttackConfig of this trial, frozen classifier, device); the settings go to the run's params."""
    from tldr_core.attack.config import AttackConfig

    s, device = inputs.settings, trial_device(inputs)
    base = AttackConfig(steps=int(s["steps"]), seed=int(s["seed"]), per_class=int(s["per_class"]), device=device)
    cfg = inputs.space.attack_config(config, base=base)
    run.log_params({**cfg.flat(), **run_params(inputs, trial_id)})
    return cfg, trial_classifier(inputs), device


def _progress_callback(inputs: TrialInputs, run: TrialRun, cfg, classifier, device: str, state: dict[str, Any]):
    """train_generator's callback: every eval_every steps score eval_per_class reconstructions per class
    and report them (`report_progress`)."""
    import torch

    from tldr_core.attack.train import generate

    s = inputs.settings
    eval_every = int(s["eval_every"])

    def callback(step: int, record: dict[str, Any], gen) -> bool:
        state["pending"].append(record)
        state["last"].update(record)
        if step % eval_every == 0 and step < cfg.steps:
            with torch.random.fork_rng(devices=[]):  # generate() reseeds torch: keep training's RNG stream
                images, labels = generate(gen, int(s["eval_per_class"]), seed=cfg.seed + 1, device=device)
                gen.train()  # train_generator sets train mode itself each step; generate() switched to eval
                # score_images moves the classifier to the CPU (label agreement); training needs it back
                report_progress(inputs, run, state, step, record, images, labels, classifier, cfg.seed)
            classifier.to(device)
        return False

    return callback


def _run_tldr(config: dict[str, Any], inputs: TrialInputs, run: TrialRun, trial_id: str, state: dict[str, Any]):
    """Train the trial's generator; returns (AttackOutput, AttackConfig, classifier)."""
    from tldr_core.attack.tldr import run_tldr

    cfg, classifier, device = _prepare(config, inputs, run, trial_id)
    callback = _progress_callback(inputs, run, cfg, classifier, device, state)
    attack = run_tldr(classifier, inputs.bundle.num_classes, inputs.bundle.image_shape, cfg, callback=callback,
                      log=None, log_every=int(inputs.settings["log_every"]))
    return attack, cfg, classifier


def _log_artifacts(run: TrialRun, work: Path, scored, bundle, number: int, objective: str, what: str,
                   meta: dict[str, Any] | None = None) -> None:
    """The audit's files (reconstructions.npz, grid.png, nearest.png, ...) as run artifacts; with `meta`
    also the attack's checkpoint (KKT: kkt.pt). The generator is logged as a model (:func:`_log_generator`)."""
    from tldr_core.report.artifacts import write_artifacts

    m = scored.metrics
    head = "" if objective == "quality" else f"{objective} {m.get(objective, float('nan')):.3f}, "  # said once
    title = (f"trial {number} ({what}): {head}"
             f"quality {m['quality']:.3f}, label agreement {m['label_agreement']:.2f}")
    paths = write_artifacts(work, bundle, scored, title=title, meta=meta, checkpoint=meta is not None)
    for path in paths.values():
        run.log_artifact(path)


def _log_generator(c, run: TrialRun, work: Path, attack, cfg, metrics: dict[str, float], inputs: TrialInputs,
                   trial_id: str) -> None:
    """The generator as a weights-only checkpoint logged as a pyfunc model; `sample` records the
    per_class and seed its scored reconstructions were drawn with, the registered model's defaults."""
    from tldr_core.attack.checkpoints import GENERATOR_FORMAT, save_checkpoint
    from tldr_core.platform.registry.models import log_checkpoint_model

    meta = {"attack": cfg.flat(), "dataset": inputs.bundle.name, "metrics": metrics,
            "classifier": inputs.classifier_ref.get("uri"), "trial_id": trial_id,
            "sample": {"per_class": cfg.per_class, "seed": cfg.seed + 1}}
    ckpt = save_checkpoint(work / "generator.pt", attack.module.cpu(), GENERATOR_FORMAT, meta)
    info = log_checkpoint_model(c, run.run_id, ckpt, "generator")
    run.set_tags({tr.GENERATOR_MODEL: info.model_uri, tr.GENERATOR_MODEL_ID: getattr(info, "model_id", "") or ""})


def _finish(c, run: TrialRun, attack, cfg, classifier, inputs: TrialInputs, trial_id: str, number: int,
            last: dict[str, Any]) -> dict[str, Any]:
    """Score the final reconstructions with the audit's pipeline, log metrics, artifacts and the
    generator (TLDR) or the candidates' checkpoint (KKT), with the run as MLflow's active run (its
    models then land in its Models column); ends the run FINISHED and returns the final report."""
    from tldr_core.scoring.pipeline import score_attack

    s, bundle = inputs.settings, inputs.bundle
    scored = score_attack(attack, classifier, bundle, tau=float(s["tau"]), seed=cfg.seed)
    metrics = scored.metrics
    speed = attack.steps / max(attack.seconds, 1e-9)
    train = {"train/steps_per_second": speed, "train/seconds": attack.seconds, "train/steps": attack.steps}
    run.log_metrics({**score_metrics(metrics, s["objective"]), **train}, attack.steps)
    work = Path(tempfile.mkdtemp(prefix="trial-", dir=os.environ.get("TMPDIR") or None))
    try:
        with tr.active_run(run.run_id):
            if attack.kind == "tldr":
                _log_artifacts(run, work, scored, bundle, number, s["objective"], cfg.variant)
                _log_generator(c, run, work, attack, cfg, metrics, inputs, trial_id)
            else:  # the checkpoint is a plain run artifact (weights-only; checkpoints.load_kkt_candidates)
                meta = {"metrics": metrics, "classifier": inputs.classifier_ref.get("uri"), "trial_id": trial_id}
                _log_artifacts(run, work, scored, bundle, number, s["objective"], attack.kind, meta=meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # everything is in MLflow now
    run.end("FINISHED", "finished")
    return {**metrics, **loss_metrics(last), STEP: attack.steps, "steps_per_second": speed,
            "train_seconds": attack.seconds}


def run_trial(config: dict[str, Any], inputs: TrialInputs | None = None) -> None:
    """One Tune trial: run the search's attack (a TLDR generator, or KKT candidates) with the sampled
    settings, score it, record it in MLflow."""
    import torch
    from ray import tune

    assert inputs is not None
    s = inputs.settings
    tr.quiet_mlflow_env()
    torch.set_num_threads(max(1, int(s["cpus_per_trial"])))
    ctx = tune.get_context()
    if os.environ.get("TLDR_TEST_KILL_TRIAL") == str(config.get(TRIAL_NUMBER)):
        os.kill(os.getpid(), 9)  # tests only: a worker that dies before its trial opened a run (SIGKILL)
    c = tr.client(s["tracking_uri"])
    run, number = _open_run(c, config, inputs, ctx)
    state: dict[str, Any] = {"last": {}, "step": 0, "pending": []}
    try:
        if s.get("attack", "tldr") == "kkt":
            from tldr_core.platform.search.trial_kkt import run_kkt_trial as run_attack
        else:
            run_attack = _run_tldr
        attack, cfg, classifier = run_attack(config, inputs, run, ctx.get_trial_id(), state)
        run.log_history(state["pending"])
        final = _finish(c, run, attack, cfg, classifier, inputs, ctx.get_trial_id(), number, state["last"])
    except SystemExit:
        # Ray Tune stops a trial by raising SystemExit inside tune.report(): ASHA, or the whole search
        # being interrupted. Only the driver knows which (trial_status), so the run stays RUNNING here.
        raise
    except BaseException as exc:
        run.fail(exc)
        raise
    tune.report({**final, FINAL: 1.0})
