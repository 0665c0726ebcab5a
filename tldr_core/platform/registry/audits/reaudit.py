"""Re-audit of registered classifiers (the logic behind `tldr reaudit`, `python tune/reaudit.py`;
the routine from a new version to a blocked or allowed promotion is docs/registry.md).

Every version of every registered model `tldr-classifier-<dataset>` carries its audit state as
model-version tags:

    audit.status    running | done | error | failed
    audit.started / audit.time   ISO-8601 UTC time the current/last audit began / ended
    audit.risk (LOW | MEDIUM | HIGH: the reconstruction axis, the worst attack's), audit.risk_reason,
    audit.risk_attack, audit.criterion, audit.membership (LOW | MEDIUM | HIGH | not run) with
    audit.membership_reason / _criterion / _attack, audit.verdict (the sentence), audit.attacks
    audit.exposure_auc / _tpr (+ _lo, _hi: the worst attack's), audit.exposure_auc.<attack>, ...,
    audit.membership_auc / _tpr (+ _lo, _hi), audit.quality, audit.gap (+ CI), audit.coverage,
    audit.label_agreement, audit.stationarity_residual (when computed)
    audit.run_id    the MLflow run holding the audit (report.html and every file)
    audit.rule_version, audit.sha256, audit.lineage   the rule, the file and the data it was judged on
    audit.compared_with, audit.compared_by, audit.regression (true | false), audit.regression.axes,
    audit.lineage_match, audit.delta.<axis>.<auc|tpr> (+ _lo, _hi)   the comparison (compare_versions)
    audit.history_run   the model's history run; audit.search_run (with --search) the search's run
    audit.error     why the last audit did not finish (status error or failed)
    reaudit=requested   set by hand to force a new audit; removed when it is done

A version is PENDING when it has no audit.status, when its status is `running` (an audit that was
killed midway), when its status is `failed`, when it carries reaudit=requested, when its last audit
(done or error) is older than --max-age-days, or when its finished audit is stale (gate.stale_reason:
another rule version, a changed model file, or, for a version newer than the champion, a comparison
with another version than the champion). `error` means its model could not be loaded (weights-only,
no pickled code runs): it is skipped until it ages out or is requested again.

Each audit (:func:`audit_one`): the audit itself (version_audit: every attack that applies, membership,
the same rule as `tldr audit`; with --search first a search as before, whose result it uses), the
comparison with the version it would replace (compare_versions; that version is audited first when its
audit cannot be compared), the report's side-by-side and history sections, one MLflow run holding the
whole audit folder (reaudit_runs), the tags above, and the model's history run.
"""
from __future__ import annotations

import datetime as _dt
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tldr_core.platform.registry.audits.audit_tags import (ERROR, LINEAGE, REQUEST_TAG, REQUESTED, RULE_VERSION, RUN_ID,
                                                    SHA256, STARTED, STATUS, TIME, Candidate, ReauditError,
                                                    audit_results, comparison_tags, now_iso, one_line, parse_iso,
                                                    record_tags, replace_audit_tags, rule_version, set_version_tags)
from tldr_core.platform.registry.audits.reaudit_search import (_echo, prepare_space, run_search, search_settings,  # noqa: F401
                                                        warm_start_point, write_space)
from tldr_core.platform.registry.audits.version_audit import Options, VersionAudit, audit_version  # noqa: F401
from tldr_core.platform.tracking import store as tr

PREFIX = "tldr-classifier-"
SEARCH_TAGS = ("audit.generator", "audit.promotion", "audit.trial_run")
Say = Callable[[str], None]
# ------------------------------------------------------------------------------------- what to audit


def pending_reason(tags: dict[str, str], max_age_days: float, now: _dt.datetime,
                   expected_baseline: str | None = None, check_rule: bool = False) -> str | None:
    """Why a version with these tags needs an audit, or None when it does not. ``check_rule``: a finished
    audit under another rule version (or none) is stale; ``expected_baseline``: the version it would
    replace (a models:/ URI) when that is the champion, so a comparison with another version is stale."""
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
    if status == "done" and (check_rule or expected_baseline is not None):
        from tldr_core.platform.registry.audits.gate import stale_reason

        stale = stale_reason(tags if check_rule else {**tags, RULE_VERSION: rule_version()}, expected_baseline)
        if stale:
            return f"stale audit: {stale}"
    return None


def find_candidates(c, max_age_days: float, dataset: str | None = None,
                    now: _dt.datetime | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(pending, up to date) classifier versions of every registered tldr-classifier-* model, by model and
    version (so a version's predecessor is audited before it)."""
    from tldr_core.platform.registry.champion import CHAMPION
    from tldr_core.platform.registry.models import alias_version

    now = now or _dt.datetime.now(_dt.timezone.utc)
    models = tr.retry(lambda: list(c.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")))
    names = sorted(m.name for m in models if m.name.startswith(PREFIX))
    if dataset:
        names = [n for n in names if n == PREFIX + dataset]
    todo, done = [], []
    for name in names:
        versions = tr.retry(lambda: list(c.search_model_versions(f"name = '{name}'")))
        holder = alias_version(c, name, CHAMPION)
        champion = int(holder.version) if holder is not None else None
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = dict(mv.tags or {})
            ds = tags.get("dataset") or name[len(PREFIX):]
            newer = champion is not None and int(mv.version) > champion  # a candidate to replace the champion
            reason = pending_reason(tags, max_age_days, now, f"models:/{name}/{champion}" if newer else None,
                                    check_rule=True)
            cand = Candidate(name, str(mv.version), ds, reason or f"audit.status={tags.get(STATUS)} at "
                                                                   f"{tags.get(TIME)}", tags)
            (todo if reason else done).append(cand)
    return todo, done


# ------------------------------------------------------------------------------------- one audit

@dataclass
class Outcome:
    """How one version's audit ended: status (done | error | failed), its verdict levels, and whether
    it regressed against the version it would replace (and on which axes)."""

    status: str
    levels: dict[str, str] = field(default_factory=dict)
    regression: bool = False
    axes: list[str] = field(default_factory=list)
    compared_with: str = "none"


Ensure = Callable[[Candidate], None]


def _baseline_scores(c, cand: Candidate, tmp: Path, ensure: Ensure | None, say: Say):
    """(the baseline's ModelVersion or None, how chosen, its VersionScores or None, why not usable)."""
    from tldr_core.platform.registry.audits.compare_versions import baseline_version, download_scores, unusable

    base, how = baseline_version(c, cand.name, cand.version)
    if base is None:
        return None, how, None, ""
    why = unusable(dict(base.tags or {}))
    if why and ensure is not None:
        say(f"  the version it would replace, {base.version}, cannot be compared ({why}): auditing it first")
        ensure(Candidate(cand.name, str(base.version), cand.dataset, f"baseline of version {cand.version}",
                         dict(base.tags or {})))
        base = tr.retry(lambda: c.get_model_version(cand.name, str(base.version)))
        why = unusable(dict(base.tags or {}))
    if why:
        return base, how, None, why
    scores = download_scores(c, base.tags[RUN_ID], tmp / f"baseline-v{base.version}")
    missing = [m for m in scores.missing if m != "membership.csv"]
    return base, how, (None if missing else scores), (f"its audit run lacks {', '.join(missing)}" if missing else "")


def compare_with_baseline(c, cand: Candidate, va: VersionAudit, tmp: Path, ensure: Ensure | None,
                          say: Say) -> tuple[dict | None, str | None, str]:
    """(Comparison.as_dict() or None, the baseline's URI or None, how it was chosen)."""
    from tldr_core.platform.registry.audits.compare_versions import compare_scores
    from tldr_core.report.score_files import read_version_scores
    from tldr_core.scoring.compare import Comparison, verdict_levels

    base, how, scores, why = _baseline_scores(c, cand, tmp, ensure, say)
    if base is None:
        return None, None, how
    uri = f"models:/{cand.name}/{base.version}"
    mine = read_version_scores(va.folder)
    if scores is None:  # its files are unusable: the verdict levels from its tags only
        levels = {"reconstruction": base.tags.get("audit.risk", "?"), "membership": base.tags.get("audit.membership", "?")}
        cmp = Comparison([], verdict_levels(levels, mine.levels), paired=False, note=f"not paired: {why}")
    else:
        cmp = compare_scores(scores, mine)
    return cmp.as_dict(), uri, how


def _sections(c, cand: Candidate, va: VersionAudit, cmp: dict | None, base: str | None, how: str,
              tags: dict[str, str], opts: Options) -> tuple[str, list[dict]]:
    """Write the comparison and history sections into the report; returns (history run id, rows)."""
    from tldr_core.platform.registry.audits.history import history_rows
    from tldr_core.platform.registry.audits.reaudit_runs import history_run, ui_link
    from tldr_core.report.comparison import comparison_section, history_section, insert_sections
    from tldr_core.report.history_chart import history_figure

    hist, exp = history_run(c, cand.name, cand.dataset)
    rows = history_rows(c, cand.name, {cand.version: tags})
    where = f"run {hist} (history-{cand.name}) in experiment tldr-{cand.dataset}"
    report = va.folder / "report.html"
    report.write_text(insert_sections(report.read_text(encoding="utf-8"), [
        comparison_section(cmp, cand.uri, base, how),
        history_section(cand.name, history_figure(rows, cand.name), where, ui_link(opts.tracking_uri, exp, hist))]),
        encoding="utf-8")
    (va.folder / "comparison.json").write_text(json.dumps({"candidate": cand.uri, "baseline": base, "chosen": how,
                                                           "comparison": cmp}, indent=1, default=str))
    return hist, rows


def _finish(c, cand: Candidate, va: VersionAudit, opts: Options, tmp: Path, ensure: Ensure | None,
            say: Say) -> Outcome:
    """After the audit: compare, write the sections, log the run, tag the version, update the history."""
    from tldr_core.platform.registry.audits.history import update_history
    from tldr_core.platform.registry.audits.reaudit_runs import log_version_audit

    cmp, base, how = compare_with_baseline(c, cand, va, tmp, ensure, say)
    tags = {**record_tags(va.record), **comparison_tags(cmp, base, how), RULE_VERSION: rule_version(),
            SHA256: va.sha256, LINEAGE: json.dumps(va.lineage, sort_keys=True)[:4000]}
    if va.search_run:  # what the search wrote on the version (its generator, promotion) stays
        now = dict(tr.retry(lambda: c.get_model_version(cand.name, cand.version)).tags or {})
        tags.update({k: now[k] for k in SEARCH_TAGS if k in now})
        tags.update({"audit.search_run": va.search_run, "audit.warm_start": va.warm_start})
    hist, rows = _sections(c, cand, va, cmp, base, how, tags, opts)
    run_id, _exp = log_version_audit(c, va.folder, va.record, va.bundle, cand.uri, cmp,
                                     {"tldr.regression": tags["audit.regression"], "tldr.compared_with": tags[
                                         "audit.compared_with"], "tldr.history_run": hist})
    replace_audit_tags(c, cand, {**tags, RUN_ID: run_id, "audit.history_run": hist})
    update_history(c, cand.name, hist, rows, cand.version, tmp / "history")
    levels = {k: v for k, v in (va.record.get("verdict") or {}).items() if k != "sentence"}
    return Outcome("done", levels, tags["audit.regression"] == "true",
                   [a for a in tags["audit.regression.axes"].split(",") if a], tags["audit.compared_with"])


def _load(c, cand: Candidate, tmp: Path, say: Say):
    """The version's (model, meta, ref, path); None after tagging it `error` when it does not load."""
    from tldr_core.platform.registry.models import load_registered_classifier

    try:
        return load_registered_classifier(c, cand.uri, tmp / "model")
    except Exception as exc:  # noqa: BLE001 - CheckpointError, RegistryError, missing artifacts...
        msg = f"model does not load: {one_line(str(exc).replace(str(tmp / 'model'), cand.uri))}"
        set_version_tags(c, cand, {STATUS: "error", ERROR: msg, TIME: now_iso()})
        say(f"  {cand.uri}: error, skipped: {msg}")
        return None


def _search(c, cand: Candidate, opts: Options, tmp: Path, say: Say) -> tuple[str, str]:
    """Run the audit's search (--search); (its run id, where its warm start came from). ReauditError when it
    failed."""
    space_file, source = prepare_space(c, cand, opts, tmp / "space.yaml")
    say(f"  search ({opts.search_attack}), warm start: {source}")
    run_id, failure = run_search(cand, opts, space_file, _echo(say, opts.quiet))
    if failure is not None:
        raise ReauditError(failure + (f" (search run {run_id})" if run_id else ""))
    return run_id, source


def audit_one(c, cand: Candidate, opts: Options, say: Say, ensure: Ensure | None = None) -> Outcome:
    """Audit one classifier version (module doc). ``ensure(candidate)``: audit another version first (the
    baseline, when its audit cannot be compared); None: compare with what it has."""
    set_version_tags(c, cand, {STATUS: "running", STARTED: now_iso()})  # a kill from here on leaves it pending
    with tempfile.TemporaryDirectory(prefix="tldr-reaudit-") as tmp_name:
        tmp = Path(tmp_name)
        loaded = _load(c, cand, tmp, say)
        if loaded is None:
            return Outcome("error")
        try:
            search_run, source = _search(c, cand, opts, tmp, say) if opts.search else (None, "")
            va = audit_version(c, cand, opts, loaded, tmp / "audit", tmp / "work", say, search_run)
            va.warm_start = source
            out = _finish(c, cand, va, opts, tmp, ensure, say)
        except Exception as exc:  # noqa: BLE001 - failed: retried by the next run; the others still run
            msg = one_line(exc)
            set_version_tags(c, cand, {STATUS: "failed", ERROR: msg, TIME: now_iso()})
            say(f"  {cand.uri}: audit failed (retried next run): {msg}")
            return Outcome("failed")
    m = va.record.get("metrics", {})
    say(f"  {cand.uri}: done, reconstruction {out.levels.get('reconstruction')} (worst attack "
        f"{va.record.get('risk_attack')}), membership {out.levels.get('membership')}; exposure AUC "
        f"{m.get('exposure_auc', float('nan')):.3f}; compared with {out.compared_with}: "
        + (f"REGRESSION on {', '.join(out.axes)}" if out.regression else "no regression"))
    return out


__all__ = ["PREFIX", "Options", "Outcome", "Candidate", "ReauditError", "audit_results", "pending_reason",
           "find_candidates", "audit_one", "compare_with_baseline", "warm_start_point", "write_space",
           "search_settings", "run_search", "now_iso", "one_line", "parse_iso"]
