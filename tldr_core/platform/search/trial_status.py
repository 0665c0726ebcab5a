"""The driver's side of a search's trials (`MlflowTrialStatus`, a Ray Tune callback): it decides how a
trial's MLflow run ends whenever the trial cannot say so itself, and prints one line per trial.

A trial's worker ends its run FINISHED when it ran every step, or FAILED when it raised. When Ray Tune
stops a trial (`SystemExit` inside `tune.report`) the worker cannot tell whether ASHA stopped it or
the whole search is being interrupted, so it leaves the run RUNNING and this callback decides:

- `on_trial_complete` without the final report: ASHA stopped it -> FINISHED, `tldr.end=early-stopped`
  (as Ray's own MLflowLoggerCallback ends such trials; KILLED is kept for interruptions);
- `on_trial_error`: FAILED, with the last line of Ray's error file; a trial whose worker died before
  it opened its run gets one here, so every trial Ray knows about has a run;
- an interrupted search (Ctrl-C: Ray calls no trial hook) is closed by the search itself
  (`close_interrupted`): KILLED, `tldr.end=interrupted`, and a run for every trial that never opened one.

Progress counts trials by id, so a trial is never counted twice ("N/M done" never passes M, also
after --resume).
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ray import tune as _tune

from tldr_core.platform.search.spaces.specs import TRIAL_NUMBER
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import (ENDED, FINAL, STEP, create_trial_run, ended_trials, summarize_trials,
                                           trial_runs)


def trial_number(trial) -> int:
    try:
        return int((trial.config or {}).get(TRIAL_NUMBER, 0))
    except (TypeError, ValueError):
        return 0


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _error_line(trial) -> str:
    """The last non-empty line of the trial's Ray error file ('' when there is none)."""
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            lines = [ln for ln in Path(trial.error_file).read_text().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else ""
    except Exception:  # noqa: BLE001 - a progress detail only
        pass
    return ""


def end_trial_run(c, experiment_id: str, search_run_id: str, trial, status: str, state: str,
                  note: str | None, tags: dict[str, str] | None = None) -> str:
    """End the run of Ray trial `trial` as `status`/`state` (a RUNNING one; a FAILED end overrides any);
    creates the run when the trial never opened one. Returns the run id."""
    runs = trial_runs(c, experiment_id, search_run_id, trial.trial_id)
    if not runs:
        run_id = create_trial_run(c, experiment_id, search_run_id, trial.trial_id, trial_number(trial),
                                  trial.config or {}, tags)
        tr.terminate(c, run_id, status, state, note)
        return run_id
    for run in runs:
        if run.info.status == "RUNNING" or (status == "FAILED" and run.info.status != "FAILED"):
            tr.terminate(c, run.info.run_id, status, state, note)
    return runs[0].info.run_id


def close_interrupted(c, experiment_id: str, search_run_id: str, trials: Iterable[Any],
                      tags: dict[str, str] | None = None) -> list[str]:
    """After an interruption: every trial Ray knows about that has not ended gets a KILLED run with
    `tldr.end=interrupted` (its RUNNING run closed, or one created). Returns the closed run ids."""
    ended = ended_trials(c, experiment_id, search_run_id)
    closed = []
    for trial in trials:
        if trial.trial_id in ended:
            continue
        closed.append(end_trial_run(c, experiment_id, search_run_id, trial, "KILLED", "interrupted",
                                    "search interrupted; the trial restarts on --resume", tags))
    for run in trial_runs(c, experiment_id, search_run_id):  # runs of trials Ray no longer lists
        if run.info.status == "RUNNING":
            tr.terminate(c, run.info.run_id, "KILLED", "interrupted", "search interrupted")
            closed.append(run.info.run_id)
    return closed


class MlflowTrialStatus(_tune.Callback):
    """Driver-side Ray Tune callback: ends the runs its trials could not end themselves (see the module
    docstring) and prints one line per trial with its objective and the best so far.

    Built lazily so Ray can pickle it with the experiment state (a resumed search gets it back).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, search_run_id: str, objective: str,
                 total: int, printer: Callable[[str], None] | None = None,
                 run_tags: dict[str, str] | None = None) -> None:
        self.tracking_uri, self.experiment_id, self.search_run_id = tracking_uri, experiment_id, search_run_id
        self.objective, self.total = objective, total
        self.run_tags = dict(run_tags or {})
        self._printer = printer
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_state"] = None
        d["_printer"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        d.setdefault("run_tags", {})  # state pickled before run_tags existed
        self.__dict__.update(d)

    # ----------------------------------------------------------------- helpers
    def _say(self, text: str) -> None:
        (self._printer or (lambda t: print(t, flush=True)))(text)

    def _st(self) -> dict[str, Any]:
        if self._state is None:
            c = tr.client(self.tracking_uri)
            self._state = {"client": c, "t0": time.time(), "ended": set(), "best": None, "best_trial": None}
            try:  # a resumed search: what ended before counts, once
                self._state["ended"] = set(ended_trials(c, self.experiment_id, self.search_run_id))
                for t in summarize_trials(c, self.experiment_id, self.search_run_id, self.objective):
                    if t.complete and t.value is not None and (self._state["best"] is None
                                                               or t.value > self._state["best"]):
                        self._state["best"], self._state["best_trial"] = t.value, t.number
            except Exception:  # noqa: BLE001 - progress lines only
                pass
        return self._state

    def _end(self, trial, status: str, state: str, note: str | None) -> None:
        st = self._st()
        end_trial_run(st["client"], self.experiment_id, self.search_run_id, trial, status, state, note,
                      self.run_tags)
        st["ended"].add(trial.trial_id)

    def _interrupt_hook(self, results_seen: int | None = None) -> None:
        """Tests: simulate Ctrl-C after n ended trials (TLDR_SEARCH_INTERRUPT_AFTER) or after n
        intermediate results (TLDR_SEARCH_INTERRUPT_AFTER_RESULTS), i.e. with trials mid-way."""
        st = self._st()
        ended_n = os.environ.get("TLDR_SEARCH_INTERRUPT_AFTER")
        results_n = os.environ.get("TLDR_SEARCH_INTERRUPT_AFTER_RESULTS")
        due = (results_seen is None and ended_n and len(st["ended"]) >= int(ended_n)) or \
              (results_seen is not None and results_n and results_seen >= int(results_n))
        if due and not st.get("interrupted"):
            st["interrupted"] = True
            os.kill(os.getpid(), signal.SIGINT)

    def _progress(self) -> str:
        return f"({len(self._st()['ended'])}/{self.total} done)"

    # ----------------------------------------------------------------- Tune hooks
    def setup(self, **info: Any) -> None:
        self._st()

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        cfg = trial.config or {}
        what = cfg.get("variant") or (f"kkt, layers {cfg['layers']}" if "layers" in cfg else "?")
        self._say(f"[{_fmt_time(time.time() - self._st()['t0'])}] trial {trial_number(trial)} started "
                  f"({what}, lr {cfg.get('lr', float('nan')):.2g})")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        st = self._st()
        st["results"] = st.get("results", 0) + 1
        self._interrupt_hook(results_seen=st["results"])

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        st = self._st()
        result = trial.last_result or {}
        value, n = result.get(self.objective), trial_number(trial)
        if result.get(FINAL) == 1.0:
            what = "finished"
            if value is not None and not math.isnan(value) and (st["best"] is None or value > st["best"]):
                st["best"], st["best_trial"] = value, n
            self._end(trial, "FINISHED", "finished", None)  # normally already FINISHED by the trial
        else:
            what = f"stopped by ASHA at step {result.get(STEP, '?')}"
            self._end(trial, "FINISHED", "early-stopped", f"stopped by the scheduler after step {result.get(STEP, '?')}")
        self._line(n, what, value, result.get("label_agreement"))
        self._interrupt_hook()

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        err = _error_line(trial)
        self._end(trial, "FAILED", "failed", err or "trial raised (see Ray Tune's error file)")
        self._say(f"[{_fmt_time(time.time() - self._st()['t0'])}] trial {trial_number(trial)} FAILED: "
                  f"{err[:160] or 'see the MLflow run'} {self._progress()} | {self._best_text()}")
        self._interrupt_hook()

    def _best_text(self) -> str:
        st = self._st()
        return ("best so far: none finished" if st["best"] is None else
                f"best so far {st['best']:.4f} (trial {st['best_trial']})")

    def _line(self, n: int, what: str, value: Any, la: Any) -> None:
        v = "n/a" if value is None else f"{value:.4f}"
        la_s = "n/a" if la is None else f"{la:.2f}"
        self._say(f"[{_fmt_time(time.time() - self._st()['t0'])}] trial {n} {what}: {self.objective} {v}, "
                  f"label agreement {la_s} {self._progress()} | {self._best_text()}")


__all__ = ["ENDED", "MlflowTrialStatus", "close_interrupted", "end_trial_run", "trial_number"]
