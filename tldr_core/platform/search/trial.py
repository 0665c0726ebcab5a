"""The Ray Tune side of the search (`tldr_core.platform.search`): the trial function (the driver's
callback that ends what a trial cannot end itself is `trial_status.MlflowTrialStatus`).

This module is imported by Ray workers, so it lives in the package. Training code
(`tldr_core.attack.train`) never imports Ray; the trial adapts it through `train_generator`'s callback:
every `eval_every` generator steps the trial scores a few reconstructions (`pipeline.score_images`:
quality, gap, ..., and exposure), logs them to MLflow, then calls `tune.report` (where ASHA may stop
it). Everything a trial needs from MLflow is written before each report, and the run is ended before
the final report, because code after `tune.report()` may never run. A trial stopped inside
`tune.report()` leaves its run RUNNING: only the driver knows whether ASHA stopped it or the search
was interrupted (`trial_status`). MLflow names: `eval/<score>`, `Objective/<objective>`, `loss/...`,
`wloss/...`, `train/...` (`tracking`); the run's data sets (T, H', test) are logged as its inputs.

A search with `attack: kkt` runs the stationarity attack instead (`trial_kkt`, same reports, same
scoring); the final step (`_finish`) is shared: the TLDR generator is logged as a pyfunc model, the
KKT candidates as the checkpoint artifact `kkt.pt`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tldr_core.platform import tracking as tr
from tldr_core.platform.search_space import TRIAL_NUMBER
from tldr_core.platform.trial_runs import FINAL, STEP, TrialRun
# the callback lived here: tuners pickled by older searches name it tldr_core.platform.tuning.MlflowTrialStatus
from tldr_core.platform.trial_status import MlflowTrialStatus  # noqa: F401


@dataclass
class TrialInputs:
    """Everything every trial shares; `tune.with_parameters` stores it once in Ray's object store."""

    settings: dict[str, Any]           # SearchSettings as a dict (steps, objective, tracking URI, ...)
    space: Any                         # tldr_core.platform.search_space.SearchSpace
    classifier_spec: dict[str, Any]
    classifier_state: dict[str, Any]   # state_dict tensors
    bundle: Any                        # tldr_core.attack.data.DatasetBundle
    baselines: dict[str, dict[str, float]]
    experiment_id: str
    search_run_id: str
    classifier_ref: dict[str, Any] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)   # mlflow.source.*, mlflow.user (tracking.context_tags)
    datasets: list[Any] = field(default_factory=list)        # mlflow DatasetInputs of T, H' and test


def loss_metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k.startswith(("loss", "wloss"))}


def baseline_metrics(baselines: dict[str, dict[str, float]]) -> dict[str, float]:
    """The baselines' scores as the search run logs them once: `baseline/<set>/<score>`."""
    keys = ("quality", "quality_heldout", "gap", "coverage", "label_agreement", "diversity", "exposure_auc",
            "exposure_tpr")
    return {f"baseline/{name}/{k}": float(v[k]) for name, v in baselines.items() for k in keys if k in v}


def score_metrics(metrics: dict[str, Any], objective: str) -> dict[str, Any]:
    """Scores as a trial logs them: `eval/<score>`, and the objective again as `Objective/<name>`."""
    out = tr.metric_names("eval", metrics)
    if objective in metrics:
        out[tr.objective_name(objective)] = metrics[objective]
    return out


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


def trial_device(inputs: TrialInputs) -> str:
    """"cuda" when the trial was given a GPU (share), else "cpu"; never a silent CPU fallback.

    Ray makes the trial's GPU the only visible one, so "cuda" is that card. With a fraction f < 1 the
    trial's CUDA memory is capped at f of the card, so trials packed onto one GPU cannot starve each other.
    """
    import torch

    gpus = float(inputs.settings["gpus_per_trial"])
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"this trial was given {gpus:g} GPU but torch sees no CUDA device here "
                           f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "install a CUDA build of torch on the workers or run with --gpus-per-trial 0")
    if gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus, 0)
    return "cuda"


def trial_classifier(inputs: TrialInputs):
    """The search's classifier, rebuilt from the object store's weights: eval mode, frozen, on the CPU."""
    from tldr_core.attack.models import build_classifier

    classifier = build_classifier(inputs.classifier_spec)
    classifier.load_state_dict(inputs.classifier_state)
    return classifier.eval().requires_grad_(False)


def run_params(inputs: TrialInputs, trial_id: str) -> dict[str, Any]:
    """The search-level params every trial run records beside its attack's settings."""
    s = inputs.settings
    return {"attack": s.get("attack", "tldr"), "eval_every": s["eval_every"], "tau": s["tau"],
            "objective": s["objective"], "trial_id": trial_id, "classifier": inputs.classifier_ref.get("uri", "")}


def _prepare(config: dict[str, Any], inputs: TrialInputs, run: TrialRun, trial_id: str):
    """(AttackConfig of this trial, frozen classifier, device); the settings go to the run's params."""
    from tldr_core.attack.config import AttackConfig

    s, device = inputs.settings, trial_device(inputs)
    base = AttackConfig(steps=int(s["steps"]), seed=int(s["seed"]), per_class=int(s["per_class"]), device=device)
    cfg = inputs.space.attack_config(config, base=base)
    run.log_params({**cfg.flat(), **run_params(inputs, trial_id)})
    return cfg, trial_classifier(inputs), device


def report_progress(inputs: TrialInputs, run: TrialRun, state: dict[str, Any], step: int, record: dict[str, Any],
                    images, labels, scorer, seed: int) -> None:
    """Score `images` with the audit's scorer (pipeline.score_images: every objective, exposure included),
    log the pending loss records and the scores, then tune.report (where ASHA may stop the trial).
    `state` holds the last record ("last"), the last reported step ("step"), the loss records not
    logged yet ("pending") and, once made, the training set's ReferenceIndex ("index")."""
    from ray import tune

    from tldr_core.scoring.pipeline import reference_index, score_images

    s = inputs.settings
    if state.get("index") is None:
        state["index"] = reference_index(inputs.bundle)
    metrics, _ = score_images(images, labels, scorer, inputs.bundle, tau=float(s["tau"]), seed=seed, n_boot=200,
                              index=state["index"])
    run.log_history(state["pending"])
    state["pending"].clear()
    run.log_metrics(score_metrics(metrics, s["objective"]), step)
    state["step"] = step
    # everything is in MLflow before this call: ASHA may stop the trial inside it
    tune.report({**metrics, **loss_metrics(record), STEP: step, FINAL: 0.0})


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
    from tldr_core.platform.registry import log_checkpoint_model

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
            from tldr_core.platform.trial_kkt import run_kkt_trial as run_attack
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
