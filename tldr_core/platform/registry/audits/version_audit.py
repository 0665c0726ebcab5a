"""One registered classifier version audited the way `tldr audit` audits a model: the same pipeline and
rule (tldr_core.scoring.audit.run_audit), written the same way (tldr_core.report.audit_files).

What runs (docs/registry.md):

- the data of the version's lineage: its data set, training-set size (checkpoint meta, else the version's
  `train_size` tag) and split seed (`data_seed` in the meta or a version tag; absent: 0, the seed every
  search and a default `tldr audit` use), so T and H' are the ones the model was trained and held out on;
- TLDR (AttackConfig's defaults, `--steps` / `--per-class`; or, with `--search`, the reconstructions of
  the search's best trial), the weight templates when the first layer is fully connected, and KKT where
  the first layer is fully connected (or `--kkt on`; on a CNN it is slow on a CPU);
- membership inference with K reference models (`--membership-refs`, default the audit's: 8, 0 with
  `--smoke-test`; trained as Ray tasks, cached; when the checkpoint does not record how it was trained,
  the loss and margin attacks only, as `tldr audit` does), and the stationarity diagnostic;
- a KKT search (`--search --search-attack kkt`) is its KKT attack: the union of its trials' candidates
  (`tldr_core.platform.search.pooled.pooled_candidates`) is scored as the KKT reconstructions.

The folder gets, beside the audit's files, `exposure_heldout.csv` per attack and `lineage.json`
(tldr_core.report.score_files): what the comparison with another version reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.registry.audits.audit_tags import Candidate, ReauditError

Say = Callable[[str], None]
SMOKE_KKT_STEPS = 50


@dataclass(frozen=True)
class Options:
    """How each version is audited (None: the default of the command it mirrors)."""

    tracking_uri: str
    trials: int | None = None            # --search: its trials (tune/search.py's default)
    steps: int | None = None             # TLDR steps of the audit (and of each search trial)
    smoke_test: bool = False
    data_root: str | None = None
    download: bool = False
    space: str | None = None
    per_class: int | None = None
    seed: int = 0
    quiet: bool = False
    address: str | None = None           # a Ray cluster (None: a local Ray), as tune/search.py --address
    storage: str | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    search: bool = False                 # also run a search (as the re-audit did before) and use its result
    search_attack: str = "tldr"
    membership_refs: int | None = None   # None: 8 (0 with smoke_test); 0: loss and margin only
    no_membership: bool = False
    kkt: str = "auto"                    # auto (first layer fully connected) | on | off
    kkt_steps: int | None = None         # None: KKTConfig's (50 with smoke_test)
    device: str = "auto"
    tau: float = 0.5


@dataclass
class VersionAudit:
    """A finished audit of one version: its folder (metrics.json, report.html, ...), the record, the
    AuditResults, the data bundle, the lineage, the checkpoint's sha256 and the search run (if any)."""

    folder: Path
    record: dict[str, Any]
    res: Any
    bundle: Any
    lineage: dict[str, Any]
    sha256: str
    search_run: str | None = None
    warm_start: str = ""  # with a search: where its first point came from


def data_seed(meta: dict[str, Any], tags: dict[str, str]) -> int:
    """The split seed of the version's data: the checkpoint's `data_seed`, else the version tag, else 0."""
    for v in (meta.get("data_seed"), tags.get("data_seed")):
        if v is not None and str(v).lstrip("-").isdigit():
            return int(v)
    return 0


def _digest(split: Any) -> str:
    h = hashlib.sha256(split.images.numpy().tobytes())
    h.update(split.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def lineage_of(bundle: Any, seed: int) -> dict[str, Any]:
    """What must match for two versions' images to pair up: data set, split seed, sizes, digests of T and H'."""
    return {"dataset": bundle.name, "data_seed": seed, "train_size": len(bundle.train),
            "heldout_size": len(bundle.heldout), "train_digest": _digest(bundle.train),
            "heldout_digest": _digest(bundle.heldout)}


#: Data bundles loaded by this process, by (data set, size, seed, root): versions of one lineage share one
#: (a re-audit audits them one after another; loading MNIST from its CSV alone takes seconds).
_BUNDLES: dict[tuple, Any] = {}


def load_data(cand: Candidate, meta: dict[str, Any], opts: Options, say: Say) -> tuple[Any, int]:
    """(the version's DatasetBundle, its split seed)."""
    from tldr_core.attack.data import load_dataset

    size = meta.get("train_size") or cand.tags.get("train_size")
    if not str(size or "").isdigit():
        raise ReauditError(f"{cand.uri}: neither the checkpoint nor the version records train_size")
    seed = data_seed(meta, cand.tags)
    key = (cand.dataset, int(size), seed, opts.data_root)
    if key not in _BUNDLES:
        if len(_BUNDLES) >= 4:  # a few lineages at most in memory
            _BUNDLES.pop(next(iter(_BUNDLES)))
        _BUNDLES[key] = load_dataset(cand.dataset, int(size), seed=seed, data_root=opts.data_root,
                                     download=opts.download)
    bundle = _BUNDLES[key]
    say(f"  data: {bundle.name} T={len(bundle.train)} H'={len(bundle.heldout)} population={len(bundle.test)} "
        f"(split seed {seed})")
    return bundle, seed


def attack_configs(classifier: Any, opts: Options) -> tuple[Any, Any | None]:
    """(TLDR's AttackConfig, KKT's KKTConfig or None) for this classifier and these options."""
    from tldr_core.attack.config import AttackConfig
    from tldr_core.attack.kkt import KKTConfig
    from tldr_core.attack.templates import applies
    from tldr_core.attack.train import resolve_device

    device = str(resolve_device(opts.device))
    flat: dict[str, Any] = {"seed": opts.seed, "device": device}
    if opts.steps is not None or opts.smoke_test:
        flat["steps"] = opts.steps if opts.steps is not None else 20
    if opts.per_class is not None or opts.smoke_test:
        flat["per_class"] = opts.per_class if opts.per_class is not None else 4
    tldr = AttackConfig.from_flat(flat)
    if opts.kkt == "off" or (opts.kkt == "auto" and not applies(classifier)):
        return tldr, None
    steps = opts.kkt_steps if opts.kkt_steps is not None else (SMOKE_KKT_STEPS if opts.smoke_test else KKTConfig.steps)
    return tldr, KKTConfig(steps=steps, seed=opts.seed, device=device, log_every=max(1, min(KKTConfig.log_every, steps)))


def reference_models(classifier: Any, meta: dict[str, Any], bundle: Any, opts: Options, say: Say) -> list | None:
    """Membership inference's reference models (None: off; []: loss and margin only), as `tldr audit`."""
    from tldr_core.attack.reference_models import settings_from_meta
    from tldr_core.attack.train import resolve_device
    from tldr_core.platform.references import DEFAULT_K, MembershipStageError, train_references

    if opts.no_membership:
        return None
    k = opts.membership_refs if opts.membership_refs is not None else (0 if opts.smoke_test else DEFAULT_K)
    if not k:
        return []
    settings, unknown = settings_from_meta(meta, classifier.spec() if hasattr(classifier, "spec") else None, {})
    if unknown:
        say(f"  membership: the checkpoint does not record {', '.join(unknown)}: loss and margin attacks only")
        return []
    try:
        refs = train_references(bundle, settings, k, address=opts.address, log=say,
                                gpus_per_task=1.0 if str(resolve_device(opts.device)).startswith("cuda") else 0.0)
    except (MembershipStageError, ValueError) as exc:
        raise ReauditError(f"reference models: {exc}") from None
    return [r.model for r in refs]


def search_outputs(c, search_run_id: str, bundle: Any, dest: Path) -> dict[str, Any]:
    """{attack kind: AttackOutput} a finished search contributes to the audit: a TLDR search its best
    trial's reconstructions; a KKT search the union of its trials' candidates (the pooled result)."""
    import numpy as np
    import torch

    from tldr_core.attack.output import AttackOutput
    from tldr_core.platform.tracking import store as tr
    from tldr_core.platform.tracking.trial_runs import best_trial, summarize_trials

    run = tr.retry(lambda: c.get_run(search_run_id))
    if run.data.tags.get(tr.ATTACK, "tldr") == "kkt":
        from tldr_core.platform.search.pooled import pooled_candidates

        out, _used, _left = pooled_candidates(c, search_run_id, dest / "pooled", tuple(bundle.image_shape))
        return {"kkt": out}
    objective = run.data.tags.get(tr.OBJECTIVE, "quality")
    best = best_trial(summarize_trials(c, run.info.experiment_id, search_run_id, objective))
    if best is None:
        raise ReauditError(f"search run {search_run_id}: no trial finished")
    local = tr.retry(lambda: c.download_artifacts(best.run_id, "reconstructions.npz", str(dest / "best")))
    with np.load(local, allow_pickle=False) as z:
        images, labels = torch.from_numpy(z["images"].astype(np.float32)), torch.from_numpy(z["labels"].astype(np.int64))
    settings = {k: _typed(v) for k, v in best.params.items()}
    return {"tldr": AttackOutput(kind="tldr", images=images, labels=labels,
                                 settings={**settings, "search_run": search_run_id, "trial_run": best.run_id})}


def _typed(text: str) -> Any:
    """An MLflow param back to its type: "0.5" -> 0.5, "400" -> 400, "True" -> True, else the string."""
    if text in ("True", "False", "true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _classifier_info(meta: dict[str, Any], ref: Any, bundle: Any, model: Any) -> dict[str, Any]:
    from tldr_core.attack.classifier import accuracy

    return {**meta, "path": ref.uri, "registry": {"name": ref.name, "version": ref.version}, "sha256": ref.sha256,
            "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels)}


def audit_version(c, cand: Candidate, opts: Options, loaded: tuple, folder: Path, work: Path, say: Say,
                  search_run_id: str | None = None) -> VersionAudit:
    """Audit ``cand`` into ``folder`` (created); ``loaded``: its (model, meta, ClassifierRef, path) as
    `models.load_registered_classifier` returns them; ``work``: a scratch folder. Raises on any failure."""
    from tldr_core.report.audit_files import write_audit_folder
    from tldr_core.report.score_files import write_score_files
    from tldr_core.scoring.audit import run_audit

    model, meta, ref, _path = loaded
    bundle, seed = load_data(cand, meta, opts, say)
    spec = model.spec() if hasattr(model, "spec") else None
    if spec and (tuple(spec["in_shape"]) != tuple(bundle.image_shape) or spec["num_classes"] != bundle.num_classes):
        raise ReauditError(f"{cand.uri} expects inputs {tuple(spec['in_shape'])}, {spec['num_classes']} classes; "
                           f"{bundle.name} has {tuple(bundle.image_shape)}, {bundle.num_classes}")
    tldr_cfg, kkt_cfg = attack_configs(model, opts)
    refs = reference_models(model, meta, bundle, opts, say)
    made = search_outputs(c, search_run_id, bundle, work / "search") if search_run_id else {}
    also = [made.get("kkt", kkt_cfg)] if (kkt_cfg is not None or "kkt" in made) else []
    say(f"  attacks: tldr{' (the search best trial)' if 'tldr' in made else f' ({tldr_cfg.steps} steps)'}"
        + (", templates" if _templates(model) else "")
        + (f", kkt ({'pooled over the search' if 'kkt' in made else f'{kkt_cfg.steps} steps'})" if also else "")
        + ("" if refs is None else f"; membership: loss, margin{f', LiRA with {len(refs)} references' if refs else ''}"))
    res = run_audit(model, bundle, tldr_cfg, tau=opts.tau, log=None if opts.quiet else say, meta=meta,
                    membership_refs=refs, attack_out=made.get("tldr"), also=also)
    folder.mkdir(parents=True, exist_ok=True)
    record = write_audit_folder(folder, bundle, res, _classifier_info(meta, ref, bundle, model), spec=spec)
    lineage = lineage_of(bundle, seed)
    write_score_files(folder, res, bundle, lineage)
    return VersionAudit(folder, record, res, bundle, lineage, ref.sha256, search_run_id)


def _templates(model: Any) -> bool:
    from tldr_core.attack.templates import applies

    return applies(model)
