"""Membership inference as a reference row of the audit: per-image scores of T and H', AUC and TPR
at low FPRs with bootstrap intervals, per attack (docs/method.md §10).

Attacks (:mod:`tldr_core.scoring.mia_scores`): ``loss`` and ``margin`` need the audited classifier
alone; ``lira`` (offline LiRA) needs K >= 2 reference models trained on the population set P,
never on T or H'. H' is the held-out set size-matched to T per class (per class c of T, the first
|T_c| held-out images), as for the exposures.

Each attack's summary holds the AUC (T against H'), the TPR at each FPR (1 % and 0.1 % by
default; the threshold is the (k+1)-th largest H' score, k = floor(fpr |H'|)) and their 95 %
percentile-bootstrap intervals (T and H' resampled independently, the same resamples for every
attack and FPR: :func:`tldr_core.scoring.membership.bootstrap_intervals_at`). An FPR that H'
cannot resolve (fewer than 1 / fpr held-out images: with 500, the 0.1 % threshold would be the
largest H' score, i.e. an FPR of 0 %, not 0.1 %) is reported as NaN with the reason in
:meth:`MembershipResult.notes`, never as a coarser number.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from tldr_core.scoring.membership import auc, bootstrap_intervals_at, tpr_at_fpr
from tldr_core.scoring.mia_scores import (PER_EXAMPLE_MIN_K, class_logits, lira_scores, loss_scores,
                                          margin_scores)

__all__ = ["ATTACKS", "DEFAULT_FPRS", "fpr_tag", "unresolved_reason", "AttackSummary", "summarize",
           "MembershipResult", "membership_from_logits", "score_membership"]

ATTACKS = ("loss", "margin", "lira")  # in the order metrics() lists them; the last one run is the best
DEFAULT_FPRS = (0.01, 0.001)


def fpr_tag(fpr: float) -> str:
    """The FPR in percent without the dot, for metric names: 0.01 -> "1", 0.001 -> "01", 0.005 -> "05"."""
    return f"{fpr * 100:g}".replace(".", "")


def unresolved_reason(fpr: float, n_heldout: int) -> str:
    """"" when ``n_heldout`` held-out images resolve ``fpr`` (at least 1 / fpr of them), else why not."""
    if n_heldout * fpr >= 1.0 - 1e-9:
        return ""
    return (f"needs >= {math.ceil(1.0 / fpr - 1e-9)} held-out images; H' has {n_heldout}: the TPR at "
            f"{fpr:.1%} FPR cannot be estimated (the threshold would let no held-out image through)")


@dataclass(frozen=True)
class AttackSummary:
    """One attack's statistics. ``tpr``, ``tpr_ci``, ``threshold`` follow ``fprs``; an unresolved
    FPR has NaN there and its reason in ``unresolved`` (keyed by the FPR)."""

    name: str
    auc: float
    auc_ci: tuple[float, float]
    fprs: tuple[float, ...]
    tpr: tuple[float, ...]
    tpr_ci: tuple[tuple[float, float], ...]
    threshold: tuple[float, ...]
    unresolved: dict[float, str] = field(default_factory=dict)

    def metrics(self, prefix: str = "mia_") -> dict[str, float]:
        """``{prefix}{name}_auc``, ``_auc_lo``, ``_auc_hi``, then per FPR ``_tpr_{tag}``, ``_lo``,
        ``_hi`` and ``_threshold_{tag}`` (:func:`fpr_tag`), all floats."""
        p = f"{prefix}{self.name}_"
        out = {f"{p}auc": self.auc, f"{p}auc_lo": self.auc_ci[0], f"{p}auc_hi": self.auc_ci[1]}
        for f, t, (lo, hi), thr in zip(self.fprs, self.tpr, self.tpr_ci, self.threshold, strict=True):
            tag = fpr_tag(f)
            out.update({f"{p}tpr_{tag}": t, f"{p}tpr_{tag}_lo": lo, f"{p}tpr_{tag}_hi": hi, f"{p}threshold_{tag}": thr})
        return {k: float(v) for k, v in out.items()}


def summarize(name: str, pos: Tensor, neg: Tensor, *, fprs: Sequence[float] = DEFAULT_FPRS, n_boot: int = 1000,
              seed: int = 0) -> AttackSummary:
    """AUC and TPR at each FPR of scores ``pos`` (T) against ``neg`` (H'), with 95 % intervals."""
    fprs = tuple(float(f) for f in fprs)
    n = int(torch.as_tensor(neg).numel())
    why = {f: unresolved_reason(f, n) for f in fprs}
    ok = [f for f in fprs if not why[f]]
    # the AUC interval needs resamples even when no FPR is resolved: read it at FPR 0
    auc_ci, cis = bootstrap_intervals_at(pos, neg, fprs=ok or [0.0], n_boot=n_boot, seed=seed)
    got = {f: (tpr_at_fpr(pos, neg, f), ci) for f, ci in zip(ok, cis)}
    nan2 = (math.nan, math.nan)
    return AttackSummary(
        name=name, auc=auc(pos, neg), auc_ci=auc_ci, fprs=fprs,
        tpr=tuple(got[f][0][0] if f in got else math.nan for f in fprs),
        tpr_ci=tuple(got[f][1] if f in got else nan2 for f in fprs),
        threshold=tuple(got[f][0][1] if f in got else math.nan for f in fprs),
        unresolved={f: r for f, r in why.items() if r})


def _rank_within(s: Tensor) -> Tensor:
    """1-based rank of every entry, 1 = highest score; ties by index (as exposure.csv orders)."""
    order = torch.sort(-s, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, s.numel() + 1)
    return rank


@dataclass(frozen=True)
class MembershipResult:
    """Per-image scores and summaries of every attack run (:func:`score_membership`).

    train_index (N,), train_labels (N,): indices into the training set T and labels.
    heldout_index (M,), heldout_labels (M,): indices into the held-out set of H', and labels.
    scores: attack -> (scores of T (N,), scores of H' (M,)), float64.
    summaries: attack -> AttackSummary.
    lira_k: reference models used (0: LiRA not run); lira_fixed_variance: pooled sigma used.
    lira_z: (z of T, z of H') when LiRA ran, else None.
    """

    train_index: Tensor
    train_labels: Tensor
    heldout_index: Tensor
    heldout_labels: Tensor
    scores: dict[str, tuple[Tensor, Tensor]]
    summaries: dict[str, AttackSummary]
    lira_k: int = 0
    lira_fixed_variance: bool = False
    lira_z: tuple[Tensor, Tensor] | None = None

    @property
    def best(self) -> str:
        """The strongest attack run: ``lira`` when reference models were given, else ``margin``."""
        return "lira" if "lira" in self.summaries else "margin"

    def metrics(self, prefix: str = "mia_") -> dict[str, float]:
        """Flat floats: every attack's :meth:`AttackSummary.metrics`, then ``{prefix}n_train``,
        ``n_heldout``, ``lira_k`` and ``lira_fixed_variance`` (1.0 / 0.0; NaN when LiRA did not run)."""
        out: dict[str, float] = {}
        for name in ATTACKS:
            if name in self.summaries:
                out.update(self.summaries[name].metrics(prefix))
        out.update({f"{prefix}n_train": float(self.train_index.numel()),
                    f"{prefix}n_heldout": float(self.heldout_index.numel()), f"{prefix}lira_k": float(self.lira_k),
                    f"{prefix}lira_fixed_variance": float(self.lira_fixed_variance) if self.lira_k else math.nan})
        return out

    def notes(self, prefix: str = "mia_") -> dict[str, str]:
        """Why a metric is NaN: ``{metric name: reason}`` for every unresolved TPR and its interval."""
        out = {}
        for name, s in self.summaries.items():
            for f, why in s.unresolved.items():
                for suffix in ("", "_lo", "_hi"):
                    out[f"{prefix}{name}_tpr_{fpr_tag(f)}{suffix}"] = why
        return out

    def ranks(self, attack: str | None = None) -> Tensor:
        """(N,) rank of each training image within T by ``attack`` (default :attr:`best`), 1 = most
        likely a member."""
        return _rank_within(self.scores[attack or self.best][0])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image of T and H': index, split ("train" = T, "heldout" = H'), label, then
        per attack ``{attack}_score`` and ``{attack}_rank`` (rank within T; None for H'), and
        ``lira_z`` when LiRA ran. T first by the best attack's rank, then H' by its score."""
        names = [a for a in ATTACKS if a in self.scores]
        ranks = {a: self.ranks(a) for a in names}
        rows = []
        for split, index, labels, col in (("train", self.train_index, self.train_labels, 0),
                                          ("heldout", self.heldout_index, self.heldout_labels, 1)):
            order = torch.sort(-self.scores[self.best][col], stable=True).indices
            for i in order.tolist():
                row: dict[str, Any] = {"index": int(index[i]), "split": split, "label": int(labels[i])}
                for a in names:
                    row[f"{a}_score"] = float(self.scores[a][col][i])
                    row[f"{a}_rank"] = int(ranks[a][i]) if col == 0 else None
                if self.lira_z is not None:
                    row["lira_z"] = float(self.lira_z[col][i])
                rows.append(row)
        return rows

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` (membership.csv); a rank of an H' image is an empty cell."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path


def size_matched(t_lab: Tensor, h_lab: Tensor) -> Tensor:
    """Indices of H' in the held-out set: per class c of T, its first |T_c| held-out images (the
    rule of the exposures, docs/method.md §6)."""
    keep = [(h_lab == c).nonzero(as_tuple=True)[0][: int((t_lab == c).sum())] for c in torch.unique(t_lab).tolist()]
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.int64)


def membership_from_logits(train_logits: Tensor, train_labels: Tensor, heldout_logits: Tensor, heldout_labels: Tensor,
                           *, ref_train_logits: Sequence[Tensor] = (), ref_heldout_logits: Sequence[Tensor] = (),
                           train_index: Tensor | None = None, heldout_index: Tensor | None = None,
                           fprs: Sequence[float] = DEFAULT_FPRS, n_boot: int = 1000, seed: int = 0,
                           per_example_min_k: int = PER_EXAMPLE_MIN_K) -> MembershipResult:
    """:func:`score_membership` on logits already computed: the target's on T (N, C) and H' (M, C),
    and each reference model's on the same images (K of each; K = 0: no LiRA)."""
    if len(ref_train_logits) != len(ref_heldout_logits):
        raise ValueError("ref_train_logits and ref_heldout_logits must hold one entry per reference model")
    t_lab, h_lab = torch.as_tensor(train_labels).long(), torch.as_tensor(heldout_labels).long()
    if t_lab.numel() == 0 or h_lab.numel() == 0:
        raise ValueError("membership scores need a non-empty T and H'")
    scores = {"loss": (loss_scores(train_logits, t_lab), loss_scores(heldout_logits, h_lab)),
              "margin": (margin_scores(train_logits, t_lab), margin_scores(heldout_logits, h_lab))}
    k, fixed, z = len(ref_train_logits), False, None
    if k:
        n = t_lab.numel()
        phi = torch.cat(scores["margin"])
        refs = torch.stack([torch.cat([margin_scores(a, t_lab), margin_scores(b, h_lab)])
                            for a, b in zip(ref_train_logits, ref_heldout_logits)])
        lira = lira_scores(phi, refs, per_example_min_k=per_example_min_k)
        scores["lira"] = (lira.score[:n], lira.score[n:])
        fixed, z = lira.fixed_variance, (lira.z[:n], lira.z[n:])
    summaries = {a: summarize(a, s_t, s_h, fprs=fprs, n_boot=n_boot, seed=seed) for a, (s_t, s_h) in scores.items()}
    return MembershipResult(
        train_index=torch.arange(t_lab.numel()) if train_index is None else torch.as_tensor(train_index).long(),
        train_labels=t_lab, heldout_index=torch.arange(h_lab.numel()) if heldout_index is None
        else torch.as_tensor(heldout_index).long(), heldout_labels=h_lab, scores=scores, summaries=summaries,
        lira_k=k, lira_fixed_variance=fixed, lira_z=z)


def score_membership(classifier: nn.Module, train: Any, heldout: Any, *, references: Sequence[nn.Module] = (),
                     fprs: Sequence[float] = DEFAULT_FPRS, n_boot: int = 1000, seed: int = 0,
                     per_example_min_k: int = PER_EXAMPLE_MIN_K) -> MembershipResult:
    """Membership scores of every image of T (``train``) and of H' (``heldout`` size-matched to T).

    Args:
        classifier: the audited model (eval mode is set here).
        train, heldout: objects with ``.images`` (N, C, H, W) and ``.labels`` (N,), e.g. Splits.
        references: K reference models, none trained on T or H'; K = 0 runs loss and margin only,
            K = 1 is refused (LiRA needs a spread).
        fprs, n_boot, seed: the FPRs of the TPRs and the bootstrap of their intervals.
        per_example_min_k: see :func:`tldr_core.scoring.mia_scores.lira_scores`.
    """
    if len(references) == 1:
        raise ValueError("offline LiRA needs at least 2 reference models (or none, for loss and margin only)")
    h_idx = size_matched(train.labels, heldout.labels)
    h_img, h_lab = heldout.images[h_idx], heldout.labels[h_idx]
    models = [classifier, *references]
    t_logits = [class_logits(m, train.images) for m in models]
    h_logits = [class_logits(m, h_img) for m in models]
    return membership_from_logits(t_logits[0], train.labels, h_logits[0], h_lab, ref_train_logits=t_logits[1:],
                                  ref_heldout_logits=h_logits[1:], heldout_index=h_idx, fprs=fprs, n_boot=n_boot,
                                  seed=seed, per_example_min_k=per_example_min_k)
