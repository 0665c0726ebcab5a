"""The summary a search writes on its parent run: the best trial, the objective-versus-trial plot,
Optuna parameter importances (rebuilt from the MLflow trial runs, only once MIN_IMPORTANCE_TRIALS
trials have a value: fANOVA over fewer is noise) and a table of every trial. Metric names:
`trials/<state>`, `best/<objective>`, `best/label_agreement`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from tldr_core.platform.tracking.store import log_metrics, objective_name, retry, set_tags
from tldr_core.platform.tracking.trial_runs import TrialSummary, best_trial, summarize_trials

#: Importances need at least this many trials with an objective value (finished or stopped early).
MIN_IMPORTANCE_TRIALS = 8


def plot_objective(trials: Sequence[TrialSummary], objective: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = {"finished": ("o", "tab:blue", "finished"), "early-stopped": ("v", "tab:orange", "stopped by ASHA"),
              "failed": ("x", "tab:red", "failed"), "interrupted": ("s", "tab:gray", "interrupted")}
    seen = set()
    for t in trials:
        marker, color, label = styles.get(t.state, ("s", "tab:gray", t.state or "other"))
        y = t.value if t.value is not None else float("nan")
        if t.state == "failed" or t.value is None:
            ymin = min((s.value for s in trials if s.value is not None), default=0.0)
            y = ymin
        ax.scatter([t.number], [y], marker=marker, color=color, label=None if label in seen else label, zorder=3)
        seen.add(label)
    best, xs, ys = -math.inf, [], []
    for t in trials:
        if t.complete and t.value is not None:
            best = max(best, t.value)
        if best > -math.inf:
            xs.append(t.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best finished so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial (stopped trials: last reported value; failed: at the bottom)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_importances(trials: Sequence[TrialSummary], space, objective: str) -> dict[str, float]:
    """Optuna (fANOVA) importances over the trials with an objective value.

    The study is rebuilt from the MLflow runs (the searcher's own study is not needed, so this also works
    for a resumed or finished search); see `SearchSpace.importance_features` for the encoding.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for t in trials:
        if t.value is None or t.state == "failed":
            continue
        flat = {}
        for k, v in t.params.items():
            try:
                flat[k] = float(v) if k not in ("variant", "perturbation", "mode", "grad_mode", "grad_scope") else v
            except ValueError:
                flat[k] = v
        values, dists = space.importance_features(flat)
        rows.append((values, dists, t.value))
    if len(rows) < max(2, MIN_IMPORTANCE_TRIALS):
        return {}
    common = set.intersection(*(set(v) for v, _d, _y in rows))
    varying = [k for k in sorted(common) if len({repr(v[k]) for v, _d, _y in rows}) > 1]
    if not varying:
        return {}
    study = optuna.create_study(direction="maximize")
    for values, dists, y in rows:
        study.add_trial(optuna.trial.create_trial(params={k: values[k] for k in varying},
                                                  distributions={k: dists[k] for k in varying}, value=y))
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception:  # noqa: BLE001 - e.g. too few distinct values: fall back to the simpler evaluator
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in imp.items()}


def plot_importances(imp: Mapping[str, float], objective: str, n_trials: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(items), 3) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance for {objective} (fANOVA, {n_trials} trials)")
    ax.set_title("Optuna parameter importances (loss weights on a log10 scale, off = one decade below its range)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_importances(c, search_run_id: str, trials: Sequence[TrialSummary], space, objective: str,
                     out_dir: Path, summary: dict[str, Any]) -> None:
    """Importances plot and JSON on the parent run (only past MIN_IMPORTANCE_TRIALS trials with a value);
    a failure is noted in the summary, never raised."""
    summary["importance_trials"] = sum(t.value is not None and t.state != "failed" for t in trials)
    try:
        imp = param_importances(trials, space, objective)
    except Exception as exc:  # noqa: BLE001 - a summary plot must never fail the search
        imp = {}
        summary["importance_error"] = f"{type(exc).__name__}: {exc}"
    if not imp:
        return
    plot_importances(imp, objective, sum(t.value is not None for t in trials), out_dir / "param_importances.png")
    retry(lambda: c.log_artifact(search_run_id, str(out_dir / "param_importances.png"), "summary"))
    retry(lambda: c.log_dict(search_run_id, imp, "summary/param_importances.json"))
    summary["importances"] = imp


def _tags_and_metrics(summary: dict[str, Any], best: TrialSummary | None,
                      objective: str) -> tuple[dict[str, Any], dict[str, float]]:
    """The parent run's tags (counts, best run, `best.<param>`) and metrics (counts, best values)."""
    tags: dict[str, Any] = {"tldr.trials": summary["trials"], "tldr.trials_finished": summary["finished"],
                            "tldr.trials_early_stopped": summary["early_stopped"],
                            "tldr.trials_failed": summary["failed"]}
    metrics: dict[str, float] = {"trials/finished": summary["finished"], "trials/failed": summary["failed"],
                                 "trials/early_stopped": summary["early_stopped"]}
    if best is not None:
        tags.update({"tldr.best_run": best.run_id, "tldr.best_trial": best.trial_id})
        tags.update({f"best.{k}": v for k, v in best.params.items()})
        metrics[f"best/{objective}"] = best.value
        metrics[objective_name(objective)] = best.value  # the search's row sorts and reads like its trials'
        if best.label_agreement is not None:
            metrics["best/label_agreement"] = best.label_agreement
    return tags, metrics


def write_summary(c, experiment_id: str, search_run_id: str, objective: str, space, out_dir: Path) -> dict[str, Any]:
    """Best trial, objective plot, importances and a trials table on the parent run; returns the summary."""
    trials = summarize_trials(c, experiment_id, search_run_id, objective)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_trial(trials)
    summary: dict[str, Any] = {
        "objective": objective,
        "trials": len(trials),
        "finished": sum(t.state == "finished" for t in trials),
        "early_stopped": sum(t.state == "early-stopped" for t in trials),
        "failed": sum(t.state == "failed" for t in trials),
        "best": None,
    }
    if trials:
        plot_objective(trials, objective, out_dir / "objective_vs_trial.png")
        retry(lambda: c.log_artifact(search_run_id, str(out_dir / "objective_vs_trial.png"), "summary"))
    table = [{"trial": t.number, "trial_id": t.trial_id, "run_id": t.run_id, "state": t.state, objective: t.value,
              "label_agreement": t.label_agreement, **t.params} for t in trials]
    retry(lambda: c.log_dict(search_run_id, {"trials": table}, "summary/trials.json"))
    _log_importances(c, search_run_id, trials, space, objective, out_dir, summary)
    if best is not None:
        summary["best"] = {"run_id": best.run_id, "trial_id": best.trial_id, "number": best.number,
                           objective: best.value, "label_agreement": best.label_agreement, "params": best.params}
    tags, metrics = _tags_and_metrics(summary, best, objective)
    set_tags(c, search_run_id, tags)
    log_metrics(c, search_run_id, metrics, step=0)
    retry(lambda: c.log_dict(search_run_id, json.loads(json.dumps(summary, default=str)), "summary/summary.json"))
    return summary
