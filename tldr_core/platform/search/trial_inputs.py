"""What every trial of a search is given, and the steps the TLDR trial (`trial`) and the KKT trial
(`trial_kkt`) share: `TrialInputs` (stored once in Ray's object store by `tune.with_parameters`), the
trial's device and frozen classifier, the params every trial run records, and `report_progress`
(score, log to MLflow, then `tune.report`, where ASHA may stop the trial)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import FINAL, STEP, TrialRun


@dataclass
class TrialInputs:
    """Everything every trial shares; `tune.with_parameters` stores it once in Ray's object store."""

    settings: dict[str, Any]           # SearchSettings as a dict (steps, objective, tracking URI, ...)
    space: Any                         # tldr_core.platform.search.spaces.tldr_space.SearchSpace
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


