"""The MLflow runs of a search's trials: one nested run per Ray Tune trial (`TrialRun`, written by the
trial's worker; `create_trial_run` when the driver must make it), finding them again (`trial_runs`,
`ended_trials`), closing what an interruption left open, and reading them back as `TrialSummary`
rows (`summarize_trials`, `best_trial`). Scores are read from the runs' `eval/` metrics."""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tldr_core.platform.tracking.store import (PARENT, ROLE, SEARCH_RUN, STATE, TRIAL_ID, TRIAL_NUMBER, log_metrics,
                                         log_params, loss_names, metric_batch, retry, scores_of, set_tags,
                                         terminate)

#: What a trial reports to Ray Tune besides the scores: its generator step, and 1.0 on the final report.
STEP = "step"
FINAL = "final"
#: The states of a trial that ended on its own (an interrupted one restarts on --resume).
ENDED = ("finished", "early-stopped", "failed")


def trial_runs(c, experiment_id: str, search_run_id: str, trial_id: str | None = None,
               include_deleted: bool = False) -> list:
    """The trial runs of a search (all of them, or those of one Tune trial id), every result page."""
    from mlflow.entities import ViewType

    flt = f"tags.`{SEARCH_RUN}` = '{search_run_id}' and tags.`{ROLE}` = 'trial'"
    if trial_id:
        flt += f" and tags.`{TRIAL_ID}` = '{trial_id}'"
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs, token = [], None
    while True:
        page = retry(lambda: c.search_runs([experiment_id], flt, run_view_type=view, max_results=1000,
                                           page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def ended_trials(c, experiment_id: str, search_run_id: str) -> dict[str, str]:
    """{Tune trial id: state} of the search's trials that ended (finished, early-stopped or failed)."""
    out = {}
    for run in trial_runs(c, experiment_id, search_run_id):
        state = run.data.tags.get(STATE, "")
        if state in ENDED and run.info.status != "RUNNING":
            out[run.data.tags.get(TRIAL_ID, "")] = state
    return out


def _trial_tags(search_run_id: str, trial_id: str, number: int, attempt: int,
                tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {PARENT: search_run_id, SEARCH_RUN: search_run_id, ROLE: "trial", TRIAL_ID: trial_id,
            TRIAL_NUMBER: str(number), STATE: "running", "tldr.attempt": str(attempt),
            **{k: str(v) for k, v in (tags or {}).items()}}


def create_trial_run(c, experiment_id: str, search_run_id: str, trial_id: str, number: int,
                     config: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> str:
    """A trial's run made by the driver, for a trial that never opened its own (its worker died first):
    Ray's config as params, tag tldr.created_by=driver. Returns the run id (still RUNNING)."""
    label = config.get("variant") or ("kkt" if "layers" in config else "default")
    run = retry(lambda: c.create_run(experiment_id, run_name=f"trial-{number:03d}-{label}",
                                     tags={**_trial_tags(search_run_id, trial_id, number, 1, tags),
                                           "tldr.created_by": "driver"}))
    log_params(c, run.info.run_id, {k: v for k, v in config.items() if not isinstance(v, (dict, list))})
    return run.info.run_id


@dataclass
class TrialRun:
    """The nested MLflow run of one Tune trial, as seen from the trial's worker."""

    client: Any
    run_id: str
    experiment_id: str

    @classmethod
    def start(cls, c, experiment_id: str, search_run_id: str, trial_id: str, number: int, run_name: str,
              tags: Mapping[str, Any] | None = None) -> "TrialRun":
        """Create the trial's run; a stale run of the same trial (an attempt interrupted before a resume)
        is deleted first, so every trial has exactly one active run."""
        attempt = 1
        for old in trial_runs(c, experiment_id, search_run_id, trial_id):
            attempt += 1
            if old.info.status == "RUNNING":
                retry(lambda: c.set_terminated(old.info.run_id, status="KILLED"))
            retry(lambda: c.delete_run(old.info.run_id))
        all_tags = _trial_tags(search_run_id, trial_id, number, attempt, tags)
        run = retry(lambda: c.create_run(experiment_id, tags=all_tags, run_name=run_name))
        return cls(c, run.info.run_id, experiment_id)

    def log_params(self, values: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, values)

    def log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        log_metrics(self.client, self.run_id, values, step)

    def log_history(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Loss records of train_generator (`step`, `loss`, `loss_<term>`, `wloss_<term>`) in one batch,
        as `loss/total`, `loss/<term>`, `wloss/<term>` (`tracking.loss_names`)."""
        batch = []
        for r in records:
            batch += metric_batch(loss_names(r), int(r["step"]))
        for i in range(0, len(batch), 900):
            retry(lambda: self.client.log_batch(self.run_id, metrics=batch[i:i + 900]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str, state: str, error: str | None = None) -> None:
        terminate(self.client, self.run_id, status, state, error)

    def fail(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            retry(lambda: self.client.log_text(self.run_id, text, "error.txt"))
        finally:
            self.end("FAILED", "failed", f"{type(exc).__name__}: {exc}")


def close_open_trial_runs(c, experiment_id: str, search_run_id: str, status: str, state: str,
                          reason: str = "") -> list[str]:
    """End every still-RUNNING trial run of a search (after an interruption); returns their ids."""
    closed = []
    for run in trial_runs(c, experiment_id, search_run_id):
        if run.info.status == "RUNNING":
            terminate(c, run.info.run_id, status, state, reason or None)
            closed.append(run.info.run_id)
    return closed


@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    number: int
    status: str
    state: str
    value: float | None          # the objective: final for finished trials, last reported otherwise
    label_agreement: float | None
    params: dict[str, str]
    steps: int | None
    complete: bool


def summarize_trials(c, experiment_id: str, search_run_id: str, objective: str) -> list[TrialSummary]:
    out = []
    for run in trial_runs(c, experiment_id, search_run_id):
        m, t = scores_of(run.data.metrics), run.data.tags
        value = m.get(objective)
        out.append(TrialSummary(
            run_id=run.info.run_id, trial_id=t.get(TRIAL_ID, ""), number=int(t.get(TRIAL_NUMBER, -1)),
            status=run.info.status, state=t.get(STATE, ""),
            value=None if value is None or math.isnan(value) else float(value),
            label_agreement=m.get("label_agreement"), params=dict(run.data.params),
            steps=int(run.data.metrics["train/steps"]) if "train/steps" in run.data.metrics else None,
            complete=run.info.status == "FINISHED" and t.get(STATE) == "finished"))
    return sorted(out, key=lambda s: (s.number, s.trial_id))


def best_trial(trials: Sequence[TrialSummary]) -> TrialSummary | None:
    """The finished trial with the highest objective (all objectives are maximised)."""
    done = [t for t in trials if t.complete and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None
