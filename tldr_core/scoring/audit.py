"""One audit, computed: attack -> scores -> references -> membership -> stationarity -> two-axis verdict.

    res = run_audit(classifier, bundle, cfg, meta=meta, membership_refs=[...])   # AuditResults
    res.risks()             # reconstruction axis, per attack (tldr_core.scoring.risk)
    res.membership_risk()   # membership axis (tldr_core.scoring.membership_risk), None when not run

Shared by ``tldr audit`` (tldr_core.cli.audit) and the registry's re-audit (tldr_core.platform.registry),
so both state the same verdict for the same model. Nothing here draws or writes files
(tldr_core.report.audit_files does) and nothing imports Ray: reference models for LiRA are trained one
layer up (tldr_core.platform.references) and handed in as ``membership_refs``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from tldr_core.attack.config import AttackConfig
from tldr_core.attack.kkt import KKTConfig, run_kkt
from tldr_core.attack.kkt_state import KKTResume
from tldr_core.attack.output import AttackOutput
from tldr_core.attack.templates import TemplateResult, applies as templates_apply
from tldr_core.attack.tldr import run_tldr
from tldr_core.scoring.membership_risk import assess_membership
from tldr_core.scoring.metrics import score_baselines
from tldr_core.scoring.mia import MembershipResult, score_membership
from tldr_core.scoring.pipeline import Scored, heldout_nearest, reference_index, score_attack, template_attack
from tldr_core.scoring.references import score_references
from tldr_core.scoring.risk import LEVELS, Risk, assess, worst
from tldr_core.scoring.stationarity import Stationarity, StationarityError, stationarity

Log = Callable[[str], None]
#: The margin form of the stationarity diagnostic (per-example gradients of every training image)
#: runs in an audit only below this n x parameters: above it, it would cost more than the attack.
AUDIT_STATIONARITY_NP = 300_000_000


@dataclass
class AuditResults:
    """Everything an audit computes; the report and metrics.json only present it."""

    attack: Scored                          # the attack's reconstructions, scores, exposure, nearest images
    baselines: dict[str, dict[str, float]]  # score_baselines' dict
    heldout: Scored                         # real unseen images beside their nearest training images
    templates: TemplateResult | None = None  # the weight-template attack, when the first layer is fully connected
    references: dict[str, Scored] = field(default_factory=dict)  # model-free references (scoring.references)
    membership: MembershipResult | None = None  # membership inference of T vs H' (None: not run)
    stationarity: Stationarity | None = None    # the KKT premise on T (None: not computed, see stationarity_note)
    stationarity_note: str = ""
    others: dict[str, Scored] = field(default_factory=dict)  # further attacks by kind (the re-audit's KKT)

    def risks(self) -> dict[str, Risk]:
        """The reconstruction axis per attack ("tldr" or "kkt", the other attacks, then "templates")."""
        out = {self.attack.kind: assess(self.attack.metrics, self.baselines)}
        out.update({kind: assess(s.metrics, self.baselines) for kind, s in self.others.items()})
        if self.templates is not None:
            out["templates"] = assess(self.templates.metrics, self.baselines)
        return out

    def reconstruction_risk(self) -> tuple[str, Risk]:
        """(attack, its risk) of the worst attack: the reconstruction axis of the verdict."""
        risks = self.risks()
        kinds = list(risks)
        top = kinds[worst([risks[k] for k in kinds])]
        return top, risks[top]

    def membership_risk(self) -> Risk | None:
        """The membership axis (None when membership inference did not run)."""
        return assess_membership(self.membership.metrics()) if self.membership is not None else None


def run_attack(classifier: nn.Module, bundle: Any, cfg: AttackConfig | KKTConfig, *,
               log: Log | None = print, resume: KKTResume | None = None) -> AttackOutput:
    """TLDR (an AttackConfig) or the KKT attack (a KKTConfig) against ``classifier`` on ``bundle``'s shapes."""
    if isinstance(cfg, KKTConfig):
        return run_kkt(classifier, bundle.num_classes, tuple(bundle.image_shape), cfg,
                       train_per_class=bundle.train_per_class(), log=log, resume=resume)
    return run_tldr(classifier, bundle.num_classes, tuple(bundle.image_shape), cfg, log=log)


def audit_stationarity(classifier: nn.Module, bundle: Any, meta: Mapping[str, Any] | None
                       ) -> tuple[Stationarity | None, str]:
    """The KKT premise on T (tldr_core.scoring.stationarity) when it can be had at an audit's cost, else
    (None, why not). The weight-decay form costs one gradient over T; the margin form is skipped above
    :data:`AUDIT_STATIONARITY_NP`."""
    n_params = sum(p.numel() for p in classifier.parameters())
    try:
        return stationarity(classifier, bundle.train, meta, max_np=AUDIT_STATIONARITY_NP), ""
    except StationarityError as exc:
        return None, f"not computed: {exc} ({len(bundle.train)} images x {n_params:,} parameters)"


def run_audit(classifier: nn.Module, bundle: Any, cfg: AttackConfig | KKTConfig, *, tau: float = 0.5,
              log: Log | None = print, meta: Mapping[str, Any] | None = None,
              membership_refs: Sequence[nn.Module] | None = None, resume: KKTResume | None = None,
              attack_out: AttackOutput | None = None,
              also: Sequence[AttackConfig | KKTConfig | AttackOutput] = ()) -> AuditResults:
    """The attack (scored with its exposure; ``attack_out``: reconstructions made elsewhere, e.g. pooled
    over a search), the baselines, the weight templates when they apply, the held-out comparison, the
    model-free references, membership inference (``membership_refs``: None skips it, [] runs loss and
    margin only, K >= 2 models add LiRA) and the stationarity diagnostic, all against ``bundle``.
    ``also``: further attacks (settings to run, or outputs made elsewhere) of other kinds, scored the same
    way into ``AuditResults.others`` and judged beside the first (the re-audit adds KKT on FC models)."""
    say = log or (lambda s: None)
    index = reference_index(bundle)
    out = attack_out if attack_out is not None else run_attack(classifier, bundle, cfg, log=log, resume=resume)
    attack = score_attack(out, classifier, bundle, tau=tau, seed=cfg.seed, index=index)
    others = {}
    for extra in also:
        o = extra if isinstance(extra, AttackOutput) else run_attack(classifier, bundle, extra, log=log)
        others[o.kind] = score_attack(o, classifier, bundle, tau=tau, seed=cfg.seed, index=index)
    per_class = max(1, len(out.labels) // bundle.num_classes)
    say("scoring baselines (noise, class means, real held-out images) and the model-free references")
    baselines = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, per_class,
                                classifier=classifier, tau=tau, seed=cfg.seed)
    templates = (template_attack(classifier, bundle, tau=tau, seed=cfg.seed, index=index)
                 if templates_apply(classifier) else None)
    heldout = heldout_nearest(bundle, per_class, seed=cfg.seed, index=index)
    references = score_references(classifier, bundle, tau=tau, seed=cfg.seed, index=index)
    membership = None
    if membership_refs is not None:
        say(f"membership inference: loss, margin{' and LiRA with %d reference models' % len(membership_refs) if membership_refs else ''}")
        membership = score_membership(classifier, bundle.train, bundle.heldout, references=list(membership_refs),
                                      seed=cfg.seed)
    stat, note = audit_stationarity(classifier, bundle, meta)
    if stat is not None:
        say(stat.sentence())
    return AuditResults(attack, baselines, heldout, templates, references, membership, stat, note, others)


def combined_sentence(reconstruction: Risk, membership: Risk | None) -> str:
    """What the two axes mean together, in one sentence a platform team can act on."""
    rec, mem = reconstruction.level, membership.level if membership is not None else None
    if rec == "HIGH":
        tail = "" if mem is None else (" and tells its members apart from unseen images" if mem != "LOW" else "")
        return f"Individual training images can be reconstructed from this model's weights{tail}: treat it as the data."
    if mem in ("HIGH", "MEDIUM"):
        how = "memorises its training set" if mem == "HIGH" else "lets some of its training images be told apart"
        return (f"This model {how} (membership {mem}); no individual image could be reconstructed "
                f"(reconstruction {rec}).")
    if mem is None:
        return f"Reconstruction {rec}; membership inference was not run."
    if rec == "MEDIUM":
        return ("No individual image could be reconstructed and membership is not detectable, but the model reveals "
                "statistics specific to its training set (reconstruction MEDIUM).")
    return "Neither training images nor membership could be recovered by these attacks (both axes LOW)."


def axis_levels(res: AuditResults) -> dict[str, str]:
    """{"reconstruction": level, "membership": level or "not run"}: what --fail-on and the tags read."""
    m = res.membership_risk()
    return {"reconstruction": res.reconstruction_risk()[1].level, "membership": m.level if m else "not run"}


def at_or_above(level: str, bar: str) -> bool:
    """Whether ``level`` (LOW/MEDIUM/HIGH; anything else counts as below) reaches ``bar``."""
    return level in LEVELS and LEVELS.index(level) >= LEVELS.index(bar)
