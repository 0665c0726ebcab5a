"""The Ray Tune + Optuna search over the TLDR loss weights and conditioning variants (or the KKT attack's
settings, `settings.attack == "kkt"`), as a function: `run(settings) -> search run id` (the command
line is `cli`, run as `python tune/search.py`).

One classifier per search (trained or reused once, registered in MLflow as tldr-classifier-<dataset>);
every trial trains a generator against it with settings drawn by Optuna (TPE, seeded) from the search
space, behind a concurrency limit, with ASHA stopping weak trials early on generator steps. Every
trial is a nested MLflow run of the search's run; the best finished generator is registered as
tldr-generator-<dataset> and gets the alias `champion` only if it beats the champion for the same
classifier on the same objective (`registry.promotion.promote`; a KKT search registers nothing and says so).
A KKT search also scores the union of its trials' candidates as one set on its run (`pooled`).

    from tldr_core.platform.search.driver import make_settings, run
    run_id = run(make_settings("mnist-bundled", trials=8))
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.search.parent_run import SearchRun, find_resume_run, load_settings
from tldr_core.platform.search.settings import (OBJECTIVES, SMOKE, SearchError, SearchSettings,  # noqa: F401
                                                log_every_for, make_settings)
from tldr_core.platform.search.summary import MIN_IMPORTANCE_TRIALS, write_summary
from tldr_core.platform.search.tuner import build_tuner, check_ray_address, start_ray, stop_ray
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import close_open_trial_runs, ended_trials

Say = Callable[[str], None]


class SearchInterrupted(KeyboardInterrupt):
    """The search stopped before every trial ended (Ctrl-C); `run_id` continues it with --resume."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


def resume_command(st: SearchSettings, run_id: str) -> str:
    extra = "" if st.tracking_uri == tr.default_tracking_uri() else f" --tracking-uri {tr.redact(st.tracking_uri)}"
    from tldr_core.platform.cli_flags import command_name

    return f"{command_name('python tune/search.py')} --resume {run_id}{extra}"


def _resumed(st: SearchSettings, which: str, say: Say):
    """(the stored settings of the search to continue, its run); this command's tracking URI wins."""
    c = tr.client(st.tracking_uri)
    resume_run = find_resume_run(c, st.experiment, which)
    stored = replace(load_settings(c, resume_run), tracking_uri=st.tracking_uri)
    say(f"resuming search {stored.search_name} (run {resume_run.info.run_id}): {stored.trials} trials on "
        f"{stored.dataset}, objective {stored.objective}")
    return stored, resume_run


def _check(st: SearchSettings, address: str | None, say: Say) -> None:
    """Every check that needs no work: the tracking store and the Ray address."""
    tr.check_tracking_uri(st.tracking_uri)
    check_ray_address(address)
    if address not in (None, "auto") and tr.is_local_store(st.tracking_uri):
        say(f"warning: trials on the cluster at {address} write to {tr.redact(st.tracking_uri)}, a file on this "
            "machine; unless the cluster shares it, pass --tracking-uri http://<mlflow-server>:5000")


def _fit(st: SearchSettings, search: SearchRun, address: str | None, resume: bool, say: Say) -> list:
    """Start Ray, run (or continue) the Tuner; returns Ray Tune's trials (after an interruption Ray
    marks its stopped trials TERMINATED too: how each trial ended is read from MLflow instead)."""
    space, inputs = search.space, search.trial_inputs()
    search.ray_temp = start_ray(st, address, say)
    say(f"space ({Path(st.space_source).name}): {space.describe()}")
    tuner = build_tuner(st, inputs, space, search.experiment_id, search.run_id, resume, say)
    # Ray logs each failed trial's traceback at ERROR; the callback prints one line and MLflow holds the rest
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    results = tuner.fit()
    return list(getattr(results, "_experiment_analysis").trials)


def _interrupted(st: SearchSettings, search: SearchRun, trials: list, say: Say) -> SearchInterrupted:
    """Close every trial that has not ended (KILLED, tldr.end=interrupted; a run for those that never
    opened one), tag the search, say how far it got (trials that really ended) and how to continue."""
    from tldr_core.platform.search.trial_status import close_interrupted

    closed = close_interrupted(search.c, search.experiment_id, search.run_id, trials, search.run_tags)
    done = len(ended_trials(search.c, search.experiment_id, search.run_id))
    tr.set_tags(search.c, search.run_id, {tr.STATE: "interrupted"})
    write_summary(search.c, search.experiment_id, search.run_id, st.objective, search.space,
                  tr.runs_dir() / "tmp" / st.search_name)
    say(f"\ninterrupted after {search.elapsed()}: {done} of {st.trials} trials done "
        f"({len(closed)} trial(s) marked KILLED, interrupted).")
    say(f"continue with:  {resume_command(st, search.run_id)}")
    return SearchInterrupted(search.run_id, f"search {search.run_id} interrupted")


def _finish(st: SearchSettings, search: SearchRun, report: Say) -> None:
    """Close early-stopped trials, write the summary, promote the best generator, print the summary."""
    from tldr_core.platform.registry.promotion import promote

    from tldr_core.platform.registry.audits.audit_tags import record_search_audit

    close_open_trial_runs(search.c, search.experiment_id, search.run_id, "FINISHED", "early-stopped")
    summary = write_summary(search.c, search.experiment_id, search.run_id, st.objective, search.space,
                            tr.runs_dir() / "tmp" / st.search_name)
    promo = promote(search.c, search.run_id, log=None)
    pooled = _pool(st, search) if st.attack == "kkt" else None
    tr.set_tags(search.c, search.run_id, {tr.STATE: "finished"})
    if summary.get("best"):  # the classifier version now has an audit: re-audit --dry-run says so
        record_search_audit(search.c, search.run_id, search.clf_ref.name, search.clf_ref.version)
    for line in summary_lines(st, search, summary, promo.reason, pooled):
        report(line)


def _pool(st: SearchSettings, search: SearchRun) -> str:
    """A KKT search's pooled result (`pooled`): every trial's candidates scored as one set, logged once on
    the search run; returns its output line (with the seconds it took, or why it is missing)."""
    from tldr_core.platform.search.pooled import pool_search

    search.say("pooling: scoring every trial's candidates as one set")
    return pool_search(search.c, search.run_id, search.model, search.bundle, search.baselines, tau=st.tau,
                       seed=st.seed, work=tr.runs_dir() / "tmp" / st.search_name)


def _on_ctrl_c(search: SearchRun) -> None:
    """Ctrl-C outside Ray Tune's own handling: close the running trials so --resume restarts them."""
    if search.run_id and search.experiment_id:
        try:
            close_open_trial_runs(search.c, search.experiment_id, search.run_id, "KILLED", "interrupted",
                                  "search interrupted; the trial restarts on --resume")
            tr.set_tags(search.c, search.run_id, {tr.STATE: "interrupted"})
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run(settings: SearchSettings, say: Say = print, *, address: str | None = None, resume: str | None = None,
        report: Say | None = None) -> str:
    """Run a search to the end; returns its MLflow run id (the parent of every trial run).

    say: progress lines; report: the final summary (default: say). address: a Ray cluster (host:port,
    ray://host:port or auto; default a local Ray). resume: a search run id, or "latest" (the latest
    unfinished search of settings.experiment), to continue; its stored settings are used, with this
    tracking URI. Raises SearchError / ConfigError / TrackingError / RegistryError before any work,
    SearchInterrupted (a KeyboardInterrupt) when trials are left for --resume; an exception raised
    after the search run was opened carries its id as `search_run_id`.
    """
    tr.quiet_mlflow_env()
    _check(settings, address, say)
    st, resume_run = _resumed(settings, resume, say) if resume else (settings, None)
    search = SearchRun(st, say, resume_run)
    status = "FAILED"
    try:
        search.prepare()
        trials = _fit(st, search, address, resume_run is not None, say)
        if len(ended_trials(search.c, search.experiment_id, search.run_id)) < st.trials:
            status = "KILLED"
            raise _interrupted(st, search, trials, say)
        _finish(st, search, report or say)
        status = "FINISHED"
        return search.run_id
    except KeyboardInterrupt as exc:
        status = "KILLED"
        if not isinstance(exc, SearchInterrupted):
            _on_ctrl_c(search)
        _attach_run_id(exc, search.run_id)
        raise
    except Exception as exc:
        _attach_run_id(exc, search.run_id)
        raise
    finally:
        search.end(status)
        stop_ray(search.ray_temp)


def _attach_run_id(exc: BaseException, run_id: str | None) -> None:
    if run_id:
        try:
            exc.search_run_id = run_id  # type: ignore[attr-defined]
        except AttributeError:  # exceptions with __slots__
            pass


def summary_lines(st: SearchSettings, search: SearchRun, summary: dict[str, Any], promotion: str,
                  pooled: str | None = None) -> list[str]:
    """The final summary: trial counts, the best trial against the baselines, importances, the pooled
    result's line (KKT), where to look."""
    from tldr_core.attack.config import LossWeights

    o, b = st.objective, search.baselines
    lines = [f"\nsearch {st.search_name} done in {search.elapsed()}: {summary['finished']} finished, "
             f"{summary['early_stopped']} stopped early by ASHA, {summary['failed']} failed (of {st.trials})"]
    best = summary.get("best")
    if best:
        la = best.get("label_agreement")
        lines.append(f"best trial {best['number']}: {o} {best[o]:.4f}, label agreement "
                     f"{la if la is None else round(la, 3)} (baselines: noise {b['noise'][o]:.4f}, class means "
                     f"{b['class_mean'][o]:.4f}, real held-out {b['heldout_real'][o]:.4f})")
        keys = (("variant", "lr", "epsilon") + tuple(LossWeights.names()) + ("bn", "jitter", "flip")
                if st.attack == "tldr" else ("per_class",) + tuple(search.space.params))
        lines.append("  " + ", ".join(f"{k}={best['params'][k]}" for k in keys if k in best["params"]))
    if summary.get("importances"):
        top = sorted(summary["importances"].items(), key=lambda kv: -kv[1])[:5]
        lines.append("most important parameters: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    elif summary.get("importance_trials", 0) < MIN_IMPORTANCE_TRIALS:
        lines.append(f"parameter importances: not computed ({summary.get('importance_trials', 0)} trials with a "
                     f"value; they need at least {MIN_IMPORTANCE_TRIALS})")
    return lines + ([pooled] if pooled else []) + [f"registry: {promotion}"] + _where_lines(
        st, search.experiment_id, search.run_id)


def _where_lines(st: SearchSettings, experiment_id: str, run_id: str) -> list[str]:
    lines = [f"\nresults: MLflow experiment {st.experiment!r} (id {experiment_id}), search run {run_id}",
             f"         tracking {tr.redact(st.tracking_uri)}",
             f"         Ray Tune state {st.storage.rstrip('/')}/{st.search_name}"]
    if st.tracking_uri.startswith("sqlite:"):
        db = st.tracking_uri[len("sqlite:///"):]
        cmd = "make ui" if st.tracking_uri == tr.default_tracking_uri() else f"python mlflow/serve.py --db {db}"
        lines.append(f"open the UI:  {cmd}   then  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")
    else:
        lines.append(f"open the UI:  {tr.redact(st.tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
    return lines


__all__ = ["OBJECTIVES", "SMOKE", "SearchError", "SearchInterrupted", "SearchSettings", "make_settings", "run",
           "summary_lines", "resume_command", "log_every_for"]
