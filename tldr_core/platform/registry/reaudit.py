"""Re-audit of registered classifiers (the logic behind `python tune/reaudit.py`).

Every version of every registered model `tldr-classifier-<dataset>` carries its audit state as
model-version tags:

    audit.status    running | done | error | failed
    audit.started   ISO-8601 UTC time the current/last audit began
    audit.time      ISO-8601 UTC time the last audit ended (done, error or failed)
    audit.quality, audit.gap, audit.gap_ci_low, audit.gap_ci_high, audit.coverage,
    audit.label_agreement, audit.risk (LOW | MEDIUM | HIGH), audit.risk_reason,
    audit.run_id    the search run of the audit; audit.trial_run the trial scored;
    audit.generator the generator version it registered; audit.warm_start where its settings came from
    audit.error     why the last audit did not finish (status error or failed)
    reaudit=requested   set by hand to force a new audit; removed when it is done

A version is PENDING when it has no audit.status, when its status is `running` (an audit that was
killed midway: nothing was written back, so it is audited again), when its status is `failed` (the
search itself failed, e.g. a transient error), when it carries reaudit=requested, or when its last
audit (done or error) is older than --max-age-days. `error` means its model could not be loaded
(weights-only, no pickled code runs): it is skipped until it ages out or is requested again.

Each audit is one search (`tldr_core.platform.search.driver.run`, in this process; it returns the search's
run id) against `models:/<name>/<version>`, warm-started: the search space is copied with one
`initial_points` entry holding the settings of the data set's current champion generator (its trial
run's parameters), which OptunaSearch evaluates first (points_to_evaluate). The search registers and
promotes the generator as usual; the best trial's metrics are written back to the classifier
version, with the risk level of `tldr_core.scoring.risk.assess`.
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.registry.audit_tags import (ERROR, REQUEST_TAG, REQUESTED, RESULT_TAGS, RUN_ID, STARTED,
                                                    STATUS, TIME, Candidate, ReauditError, audit_results,
                                                    delete_version_tags, now_iso, one_line, parse_iso,
                                                    set_version_tags)
from tldr_core.platform.tracking import store as tr

PREFIX = "tldr-classifier-"
# ------------------------------------------------------------------------------------- what to audit

def pending_reason(tags: dict[str, str], max_age_days: float, now: _dt.datetime) -> str | None:
    """Why a version with these tags needs an audit, or None when it does not."""
    if tags.get(REQUEST_TAG) == REQUESTED:
        return "re-audit requested (tag reaudit=requested)"
    status = tags.get(STATUS)
    if not status:
        return "never audited"
    if status == "running":
        return f"previous audit (started {tags.get(STARTED, '?')}) did not finish"
    if status == "failed":
        return f"previous audit failed: {tags.get(ERROR, '?')[:120]}"
    when = parse_iso(tags.get(TIME))
    if when is None:
        return f"audit.status={status} without a valid audit.time"
    age = (now - when).total_seconds() / 86400
    if age > max_age_days:
        return f"last audit ({status}) is {age:.1f} days old (> {max_age_days:g})"
    return None


def find_candidates(c, max_age_days: float, dataset: str | None = None,
                    now: _dt.datetime | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(pending, up to date) classifier versions of every registered tldr-classifier-* model."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    models = tr.retry(lambda: list(c.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")))
    names = sorted(m.name for m in models if m.name.startswith(PREFIX))
    if dataset:
        names = [n for n in names if n == PREFIX + dataset]
    todo, done = [], []
    for name in names:
        versions = tr.retry(lambda: list(c.search_model_versions(f"name = '{name}'")))
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = dict(mv.tags or {})
            ds = tags.get("dataset") or name[len(PREFIX):]
            reason = pending_reason(tags, max_age_days, now)
            cand = Candidate(name, str(mv.version), ds, reason or f"audit.status={tags.get(STATUS)} at "
                                                                   f"{tags.get(TIME)}", tags)
            (todo if reason else done).append(cand)
    return todo, done


# ------------------------------------------------------------------------------------- warm start

def _coerce(spec, value: str) -> Any | None:
    """An MLflow param string -> the space's type, or None when it is outside the space."""
    try:
        if spec.kind == "categorical":
            return next((ch for ch in spec.choices if str(ch) == str(value)), None)
        v = int(float(value)) if spec.kind == "int" else float(value)
    except (TypeError, ValueError):
        return None
    return v if spec.low <= v <= spec.high else None


def warm_start_point(c, dataset: str, space) -> tuple[dict[str, Any] | None, str]:
    """The settings of the data set's champion generator as an initial point of `space`, and where from."""
    from mlflow.exceptions import MlflowException

    from tldr_core.attack.config import LossWeights
    from tldr_core.platform.registry.champion import CHAMPION
    from tldr_core.platform.registry.names import generator_model_name

    name = generator_model_name(dataset)
    try:
        mv = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, "none (no champion generator for this data set yet)"
    run_id = mv.tags.get("trial_run") or mv.run_id
    try:
        params = tr.retry(lambda: c.get_run(run_id)).data.params
    except MlflowException as exc:
        return None, f"none (champion's trial run {run_id} unreadable: {one_line(exc, 120)})"
    point: dict[str, Any] = {}
    for w in LossWeights.names():
        spec = space.weights[w]
        if w not in params or not spec.searched:
            continue
        try:
            v = float(params[w])
        except ValueError:
            continue
        if v == 0 and spec.off or spec.low <= v <= spec.high:
            point[w] = v
    for p, spec in space.params.items():
        if p in params:
            v = _coerce(spec, params[p])
            if v is not None:
                point[p] = v
    if not point:
        return None, f"none (champion {name} v{mv.version} has no settings inside this space)"
    try:
        space.to_optuna_params(point)
    except Exception as exc:  # noqa: BLE001 - a point this space cannot take: search without it
        return None, f"none (champion's settings do not fit the space: {one_line(exc, 120)})"
    return point, f"{name} v{mv.version} (trial run {run_id})"


def write_space(space_path: str | None, point: dict[str, Any] | None, out: Path) -> Path:
    """Copy of the search space with `point` enqueued first (initial_points)."""
    import yaml

    from tldr_core.platform.search.spaces.load import load_space

    space = load_space(space_path)
    data = space.as_dict()
    if point:
        data["initial_points"] = [point] + [p for p in data["initial_points"] if p != point]
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    load_space(out)  # the copy must load: fail here, not inside the search
    return out


# ------------------------------------------------------------------------------------- one audit

@dataclass(frozen=True)
class Options:
    """How each audit's search runs (None: the search command's default)."""

    tracking_uri: str
    trials: int | None = None
    steps: int | None = None
    smoke_test: bool = False
    data_root: str | None = None
    download: bool = False
    space: str | None = None
    per_class: int | None = None
    seed: int = 0
    quiet: bool = False
    address: str | None = None          # a Ray cluster (None: a local Ray), as tune/search.py --address
    storage: str | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


def search_settings(cand: Candidate, opts: Options, space_file: Path):
    """The SearchSettings of one audit: the search command's defaults, against `cand`'s model, on the
    training-set size the classifier was trained with (its train_size tag)."""
    from tldr_core.platform.search.driver import make_settings

    train_size = int(cand.tags["train_size"]) if cand.tags.get("train_size", "").isdigit() else None
    return make_settings(cand.dataset, classifier=cand.uri, space=space_file, tracking_uri=opts.tracking_uri,
                         seed=opts.seed, train_size=train_size, trials=opts.trials, steps=opts.steps,
                         per_class=opts.per_class, data_root=opts.data_root, download=opts.download,
                         smoke_test=opts.smoke_test, local=opts.address is None, storage=opts.storage,
                         max_concurrent=opts.max_concurrent, cpus_per_trial=opts.cpus_per_trial,
                         gpus_per_trial=opts.gpus_per_trial)


def run_search(cand: Candidate, opts: Options, space_file: Path,
               say: Callable[[str], None]) -> tuple[str | None, str | None]:
    """Run the audit's search in this process; (search run id, None) when it finished, else
    (its run id if it got one, why it failed). Ctrl-C propagates (the version stays `running`)."""
    from tldr_core.platform.search.driver import run

    try:
        return run(search_settings(cand, opts, space_file), say, address=opts.address), None
    except Exception as exc:  # noqa: BLE001 - any failure of one audit is recorded, the others still run
        return getattr(exc, "search_run_id", None), f"search failed: {type(exc).__name__}: {one_line(exc)}"


def _echo(say: Callable[[str], None], quiet: bool) -> Callable[[str], None]:
    """The search's output, indented under the audit's lines (nothing when quiet)."""
    def echo(text: str) -> None:
        if not quiet:
            for line in text.split("\n"):
                say(f"    | {line}")

    return echo


def audit_one(c, cand: Candidate, opts: Options, say: Callable[[str], None]) -> str:
    """Audit one classifier version; returns its final audit.status (done | error | failed)."""
    from tldr_core.platform.registry.models import load_registered_classifier
    from tldr_core.platform.search.spaces.load import load_space

    started = now_iso()
    set_version_tags(c, cand, {STATUS: "running", STARTED: started})  # a kill from here on leaves it pending
    with tempfile.TemporaryDirectory(prefix="tldr-reaudit-") as tmp:
        # 1. the model must load weights-only; a version that does not is tagged and skipped
        try:
            model, _meta, _ref, _path = load_registered_classifier(c, cand.uri, Path(tmp) / "model")
            del model
        except Exception as exc:  # noqa: BLE001 - CheckpointError, RegistryError, missing artifacts...
            msg = f"model does not load: {one_line(str(exc).replace(str(Path(tmp) / 'model'), cand.uri))}"
            set_version_tags(c, cand, {STATUS: "error", ERROR: msg, TIME: now_iso()})
            say(f"  {cand.uri}: error, skipped: {msg}")
            return "error"
        # 2. warm start from the champion's settings, through a copied space with initial_points
        space = load_space(opts.space)
        point, source = warm_start_point(c, cand.dataset, space)
        space_file = write_space(opts.space, point, Path(tmp) / "space.yaml")
        say(f"  warm start: {source}")
        # 3. the search (registers and promotes the generator itself), in this process
        run_id, failure = run_search(cand, opts, space_file, _echo(say, opts.quiet))
        try:
            if failure is not None:
                raise ReauditError(failure)
            results = audit_results(c, run_id)
        except Exception as exc:  # noqa: BLE001 - failed: retried by the next run
            msg = one_line(exc)
            tags = {STATUS: "failed", ERROR: msg, TIME: now_iso(), "audit.warm_start": source}
            if run_id:
                tags[RUN_ID] = run_id
            set_version_tags(c, cand, tags)
            say(f"  {cand.uri}: audit failed (retried next run): {msg}")
            return "failed"
    delete_version_tags(c, cand, [k for k in RESULT_TAGS if k not in results] + [ERROR])
    set_version_tags(c, cand, {**results, "audit.warm_start": source, TIME: now_iso(), STATUS: "done"})
    if cand.tags.get(REQUEST_TAG) == REQUESTED:
        delete_version_tags(c, cand, [REQUEST_TAG])
    say(f"  {cand.uri}: done, risk {results['audit.risk']}: quality {results['audit.quality']}, gap "
        f"{results['audit.gap']} (95% CI {results['audit.gap_ci_low']} to {results['audit.gap_ci_high']}), "
        f"coverage {results['audit.coverage']}; search run {results[RUN_ID]}")
    return "done"
