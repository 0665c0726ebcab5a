"""The search a re-audit runs when asked (`tldr reaudit --search`), as the re-audit ran it before it ran the
whole audit: one search (`tldr_core.platform.search.driver.run`, in this process) against the version,
warm-started: the search space is copied with one `initial_points` entry holding the settings of the
data set's current champion generator (its trial run's parameters), which OptunaSearch evaluates first.
The search registers and promotes its generator as usual; the audit then uses its result
(`version_audit.search_outputs`: the best trial's reconstructions, or a KKT search's pooled candidates).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.registry.audits.audit_tags import Candidate, one_line
from tldr_core.platform.registry.audits.version_audit import Options
from tldr_core.platform.tracking import store as tr


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


def write_space(space_path: str | None, point: dict[str, Any] | None, out: Path, attack: str = "tldr") -> Path:
    """Copy of the search space with `point` enqueued first (initial_points)."""
    import yaml

    from tldr_core.platform.search.spaces.load import load_space

    space = load_space(space_path, attack)
    data = space.as_dict()
    if point:
        data["initial_points"] = [point] + [p for p in data["initial_points"] if p != point]
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    load_space(out, attack)  # the copy must load: fail here, not inside the search
    return out


def prepare_space(c, cand: Candidate, opts: Options, out: Path) -> tuple[Path, str]:
    """(the search space file of this audit's search, where its warm start came from). A TLDR search is
    warm-started from the champion generator's settings; a KKT search starts from KKTConfig's defaults
    (its space's first point: nothing is registered for KKT)."""
    from tldr_core.platform.search.spaces.load import load_space

    if opts.search_attack != "tldr":
        return write_space(opts.space, None, out, opts.search_attack), "none (a KKT search starts at the defaults)"
    point, source = warm_start_point(c, cand.dataset, load_space(opts.space))
    return write_space(opts.space, point, out), source


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
                         gpus_per_trial=opts.gpus_per_trial, attack=opts.search_attack)


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
