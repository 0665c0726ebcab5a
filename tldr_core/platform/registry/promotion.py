"""Promotion: the best finished trial of a search registered as a version of `tldr-generator-<dataset>`
(tags: the classifier version it attacks, objective, objective_value, search_run, trial_run,
label_agreement), and the alias `champion` moved to it only if it beats the current champion for the same classifier on
the same objective (never from a newer version for another classifier or objective); the alias is
decided and set under a lock against the store's state at that moment (`champion`), so re-promoting
an older search never moves it back and concurrent promotions end on the better version.

Only TLDR searches promote: a KKT search (`--attack kkt`, tag `tldr.attack=kkt`) produces candidate
images, not a sampler, so it registers nothing (its best trial's `kkt.pt` stays a run artifact);
`promote` says so and tags the search run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tldr_core.platform.registry.champion import claim_champion
from tldr_core.platform.registry.models import ensure_registered_model, model_versions
from tldr_core.platform.registry.names import RegistryError, generator_model_name
from tldr_core.platform.tracking import store as tr
from tldr_core.platform.tracking.trial_runs import TrialSummary, best_trial, summarize_trials


@dataclass
class PromotionResult:
    name: str | None
    version: str | None
    promoted: bool
    reason: str
    value: float | None = None
    champion_version: str | None = None  # the version holding the alias after the promotion


def _search_context(c, search_run_id: str) -> tuple[str, str, str, dict[str, str]]:
    """(experiment id, objective, dataset, classifier tags) of a search run; RegistryError when it is not one."""
    run = tr.retry(lambda: c.get_run(search_run_id))
    t = run.data.tags
    if t.get(tr.ROLE) != "search":
        raise RegistryError(f"run {search_run_id} is not a search run (tag {tr.ROLE}={t.get(tr.ROLE)!r})")
    objective, dataset = t.get(tr.OBJECTIVE), t.get("tldr.dataset")
    if not objective or not dataset:
        raise RegistryError(f"search run {search_run_id} lacks its objective/dataset tags")
    clf = {k: t.get(f"tldr.{k}", "") for k in ("classifier_name", "classifier_version", "classifier_sha256")}
    return run.info.experiment_id, objective, dataset, clf


def _version_of(c, name: str, versions: list, best: TrialSummary, search_run_id: str, objective: str,
                dataset: str, clf: dict[str, str], log: Callable[[str], None]):
    """The generator version holding the best trial's model: the existing one, or a new one."""
    mine = [v for v in versions if v.run_id == best.run_id]
    if mine:
        log(f"registry: {name} version {mine[0].version} already holds trial run {best.run_id}")
        return mine[0]
    best_run = tr.retry(lambda: c.get_run(best.run_id))
    source = best_run.data.tags.get(tr.GENERATOR_MODEL)
    if not source:
        raise RegistryError(f"trial run {best.run_id} has no logged generator model (tag {tr.GENERATOR_MODEL})")
    tags = {**clf, "objective": objective, "objective_value": repr(best.value), "dataset": dataset,
            "search_run": search_run_id, "trial_run": best.run_id, "trial_id": best.trial_id,
            "label_agreement": "" if best.label_agreement is None else repr(best.label_agreement),
            "variant": best.params.get("variant", "")}
    mv = tr.retry(lambda: c.create_model_version(
        name, source=source, run_id=best.run_id, tags=tags, model_id=best_run.data.tags.get(tr.GENERATOR_MODEL_ID) or None,
        description=f"search {search_run_id}, trial {best.trial_id}: {objective} {best.value:.4f}"))
    versions.append(mv)
    return mv


def promote(c, search_run_id: str, log: Callable[[str], None] | None = print) -> PromotionResult:
    """Register the best finished trial's generator of a search; alias it `champion` only if it beats the
    comparable champion (same classifier checkpoint, same objective). Idempotent for a search."""
    log = log or (lambda s: None)
    experiment_id, objective, dataset, clf = _search_context(c, search_run_id)
    best = best_trial(summarize_trials(c, experiment_id, search_run_id, objective))
    attack = tr.retry(lambda: c.get_run(search_run_id)).data.tags.get(tr.ATTACK, "tldr")
    if attack != "tldr":
        return _not_registered(c, search_run_id, attack, best, objective, log)
    if best is None:
        res = PromotionResult(None, None, False, "nothing to promote: no trial of this search finished")
        tr.set_tags(c, search_run_id, {"tldr.promotion": res.reason})
        log(f"promotion: {res.reason}")
        return res
    name = generator_model_name(dataset)
    ensure_registered_model(c, name, f"TLDR generators attacking the {dataset} classifier; alias `champion`: "
                                      "the best one for the latest audited classifier (see tldr_core/platform/registry/promotion.py).")
    versions = model_versions(c, name)
    version = str(_version_of(c, name, versions, best, search_run_id, objective, dataset, clf, log).version)
    # decided against the store's state when the alias is set, not the versions listed above
    promoted, reason, holder = claim_champion(c, name, version, best.value, clf, objective)
    tr.retry(lambda: c.set_model_version_tag(name, version, "promotion", reason))
    tr.set_tags(c, search_run_id, {"tldr.promotion": reason, "tldr.generator_model": name,
                                   "tldr.generator_version": version, "tldr.champion": str(promoted).lower()})
    log(f"promotion: {reason}")
    return PromotionResult(name, version, promoted, reason, best.value, holder)


def _not_registered(c, search_run_id: str, attack: str, best: TrialSummary | None, objective: str,
                    log: Callable[[str], None]) -> PromotionResult:
    """The promotion of a non-TLDR search: nothing registered (the registry holds generators); says where
    its best result is instead."""
    where = (f"; its best trial {best.number} ({objective} {best.value:.4f}) keeps its candidates as the run "
             f"artifact kkt.pt of run {best.run_id}" if best is not None else "; no trial of it finished")
    reason = f"nothing registered: a {attack} search has no generator to register{where}"
    tr.set_tags(c, search_run_id, {"tldr.promotion": reason, "tldr.champion": "false"})
    log(f"promotion: {reason}")
    return PromotionResult(None, None, False, reason, best.value if best is not None else None)
