"""The pooled result of a KKT search: every trial's candidates scored as one set of reconstructions.

Published KKT reconstructions (Haim et al. 2022, Buzaglo et al. 2023) are the best over a sweep's runs;
a search does the sweep. At its end the driver scores, on the search's own (parent) run, the union of
the candidates its trials left (docs/kkt.md, "Pooling across the search"):

    res = pooled_result(client, search_run_id, classifier, bundle)   # PooledResult: metrics, gallery, verdict
    out, used, left_out = pooled_candidates(client, search_run_id)   # the union as an AttackOutput, e.g. for
    # tldr_core.scoring.audit.run_audit(classifier, bundle, cfg, attack_out=out): the re-audit of a search

**Which trials.** Finished trials give their final candidates (`reconstructions.npz`, what their last
score read). Trials stopped early by ASHA give the candidates of their last evaluation
(`candidates/evaluated.npz`, which a KKT trial saves before each report to Ray Tune: ASHA stops a trial
inside that report, and it writes nothing after). They are included because leaving them out would make
the union depend on ASHA's ranking, which is read off scores on T and H'. Failed trials (a non-finite
loss or an exception) are left out: they have no final set and theirs may be non-finite; interrupted
trials do not occur here (the union is made once the search has finished). Every trial left out is
listed with the reason.

**Why pooling cannot inflate the membership test.** The union R is scored as ONE set with the audit's
scorer (`pipeline.score_attack`, what `run_audit(attack_out=...)` runs): every training image's exposure
is its best candidate over R, so the best candidate over all trials per training image comes out of the
maximum by itself; and every image of H' is scored against the same R, with the same calibration (each
candidate's best match in the population P is subtracted whichever image it reaches). More candidates
raise the scores of H' exactly as they raise those of T, and the threshold is read off H': a union that
reaches unseen images as well as training images earns no exposure. The union is chosen by the trials'
states, never by their scores (the best trial's own numbers are selected on T and H' and so optimistic);
what remains is what every search has: Optuna chose later trials' settings from scores on T and H'.

Cost: the union is held in memory (R images, R = the trials' candidates, 2 x |T| each by default) and
scored like one trial's candidates; the SSIM matrices are the scoring code's, chunked there, except the
per-class diversity matrix, (R / classes)^2 values. The search prints the seconds it took.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tldr_core.attack.output import AttackOutput
from tldr_core.platform.tracking import store as tr
from tldr_core.scoring.pipeline import Scored, score_attack
from tldr_core.scoring.risk import Risk, assess

#: The artifact of a finished trial holding its final candidates (`trial._log_artifacts`).
FINAL_NPZ = "reconstructions.npz"
#: The artifact a KKT trial rewrites at each evaluation: the candidates it just reported.
EVALUATED_NPZ = "candidates/evaluated.npz"
#: Where the pooled result goes on the search run; its metrics are `pooled/<score>`.
POOLED_DIR = "pooled"
#: Which artifact each trial state contributes (states not here are left out).
SOURCES = {"finished": FINAL_NPZ, "early-stopped": EVALUATED_NPZ}


@dataclass(frozen=True)
class TrialSource:
    """One trial of the search: what it contributes to the union (or why nothing).

    number, run_id, state: the trial; artifact: the file read (None: left out); step: the attack step
    its candidates are from (-1: unknown); candidates: how many; reason: why it was left out ("" if not)."""

    number: int
    run_id: str
    state: str
    artifact: str | None = None
    step: int = -1
    candidates: int = 0
    reason: str = ""


@dataclass
class PooledResult:
    """The union scored once. out: the union (``out.extra["trial"]``: (R,) trial number per candidate);
    scored: `score_attack`'s result (metrics, exposure, gallery); risk: the reconstruction verdict of
    the union (`scoring.risk.assess` against the search's baselines); trials / excluded: TrialSource
    lists; seconds: wall time of reading and scoring (the driver adds the logging)."""

    out: AttackOutput
    scored: Scored
    risk: Risk
    trials: list[TrialSource] = field(default_factory=list)
    excluded: list[TrialSource] = field(default_factory=list)
    seconds: float = math.nan

    @property
    def metrics(self) -> dict[str, float]:
        """score_attack's metrics plus the union's size: what is logged as `pooled/<key>`."""
        return {**self.scored.metrics, "candidates": float(len(self.out.labels)),
                "trials": float(len(self.out.extra["trials"])), "trials_excluded": float(len(self.excluded)),
                "seconds": float(self.seconds)}

    def contributions(self) -> dict[int, dict[str, int]]:
        """Per trial number: how many training images have their best candidate (calibrated exposure) from
        that trial ("best") and how many of those are exposed ("exposed")."""
        exp, owner = self.scored.exposure, self.out.extra["trial"]
        out = {int(n): {"best": 0, "exposed": 0} for n in self.out.extra["trials"]}
        exposed = set(exp.exposed_index.tolist())
        for i, r in enumerate(exp.best_recon_train.tolist()):
            if r >= 0:
                n = int(owner[r])
                out[n]["best"] += 1
                out[n]["exposed"] += int(i in exposed)
        return out

    def summary(self) -> dict[str, Any]:
        """pooled.json: metrics, verdict, the trials used and left out, each trial's contribution."""
        return {"metrics": self.metrics, "risk": self.risk.level, "criterion": self.risk.criterion,
                "reason": self.risk.reason, "trials": [asdict(t) for t in self.trials],
                "excluded": [asdict(t) for t in self.excluded],
                "contributions": {str(k): v for k, v in self.contributions().items()}}

    def line(self, seconds: float | None = None) -> str:
        """The search's output line for the pooled set, with what it cost (``seconds``, default
        PooledResult.seconds: the driver passes reading, scoring and logging together)."""
        m, stopped = self.scored.metrics, sum(t.state == "early-stopped" for t in self.trials)
        left = f", {len(self.excluded)} left out" if self.excluded else ""
        return (f"pooled: {len(self.out.labels)} candidates of {len(self.out.extra['trials'])} trials "
                f"({stopped} stopped early{left}): exposure AUC {m['exposure_auc']:.3f}, TPR@1%FPR {m['exposure_tpr']:.3f}, "
                f"matched@0.6 {m['matched_train_060']:.0f} T / {m['matched_heldout_060']:.0f} H', "
                f"verdict {self.risk.level} ({self.risk.criterion}); "
                f"{self.seconds if seconds is None else seconds:.1f} s")


# ---------------------------------------------------------------------------------- candidates files

def save_candidates(path: str | Path, images: Tensor, labels: Tensor, step: int) -> Path:
    """Write candidates (clamped to [0, 1], float32) with their labels and step (compressed npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images.detach().clamp(0, 1).float().cpu().numpy(),
                        labels=labels.detach().cpu().numpy().astype(np.int64), step=np.int64(step))
    return path


def read_candidates(path: str | Path) -> tuple[Tensor, Tensor, int]:
    """(images (R, C, H, W) float32, labels (R,) int64, step or -1) of a candidates or reconstructions npz."""
    with np.load(path, allow_pickle=False) as z:
        step = int(z["step"]) if "step" in z.files else -1
        return torch.from_numpy(z["images"].astype(np.float32)), torch.from_numpy(z["labels"].astype(np.int64)), step


def _check(images: Tensor, labels: Tensor, shape: Sequence[int] | None) -> str:
    """Why a trial's candidates cannot join the union ("" when they can)."""
    if images.dim() != 4 or labels.shape != (images.shape[0],) or images.shape[0] == 0:
        return f"unreadable candidates (images {tuple(images.shape)}, labels {tuple(labels.shape)})"
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        return f"candidates of shape {tuple(images.shape[1:])}, not {tuple(shape)}"
    if not torch.isfinite(images).all():
        return "non-finite candidates"
    return ""


# ---------------------------------------------------------------------------------- the union

def pool_candidates(parts: Sequence[tuple[int, Tensor, Tensor]]) -> AttackOutput:
    """The union of trials' candidates, [(trial number, images, labels), ...] in that order, as one KKT
    AttackOutput; ``extra["trial"]`` is each candidate's trial number (R,) int64."""
    if not parts:
        raise ValueError("pool_candidates: no trial with candidates")
    images = torch.cat([p[1].detach().float().cpu() for p in parts])
    labels = torch.cat([p[2].detach().long().cpu() for p in parts])
    owner = torch.cat([torch.full((len(p[2]),), int(p[0]), dtype=torch.int64) for p in parts])
    numbers = [int(p[0]) for p in parts]
    return AttackOutput(kind="kkt", images=images, labels=labels,
                        settings={"pooled": True, "trials": ",".join(map(str, numbers))},
                        extra={"trial": owner, "trials": numbers})


def score_pool(out: AttackOutput, classifier: nn.Module | None, bundle: Any,
               baselines: Mapping[str, Mapping[str, float]], *, tau: float = 0.5, seed: int = 0,
               trials: Sequence[TrialSource] = (), excluded: Sequence[TrialSource] = (),
               t0: float | None = None) -> PooledResult:
    """Score the union ``out`` as one set (`score_attack`: T, H' and the population against the same
    candidates) and judge it (`assess` against ``baselines``, the search's `summary/baselines.json`).
    ``t0``: when the work began (time.time()), for PooledResult.seconds (default: now)."""
    t0 = time.time() if t0 is None else t0
    scored = score_attack(out, classifier, bundle, tau=tau, seed=seed)
    return PooledResult(out, scored, assess(scored.metrics, baselines), list(trials), list(excluded),
                        time.time() - t0)


# ---------------------------------------------------------------------------------- from MLflow

def trial_candidates(c, experiment_id: str, search_run_id: str, dest: Path,
                     image_shape: Sequence[int] | None = None) -> tuple[list[tuple[TrialSource, Tensor, Tensor]],
                                                                         list[TrialSource]]:
    """Every trial's candidates the union takes ([(source, images, labels)], by trial number) and the
    trials left out (module doc: finished and early-stopped trials are read, failed ones are not)."""
    from tldr_core.platform.tracking.trial_runs import trial_runs

    used, left = [], []
    runs = sorted(trial_runs(c, experiment_id, search_run_id), key=lambda r: int(r.data.tags.get(tr.TRIAL_NUMBER, -1)))
    for run in runs:
        t, rid = run.data.tags, run.info.run_id
        number, state = int(t.get(tr.TRIAL_NUMBER, -1)), t.get(tr.STATE, "")
        artifact = SOURCES.get(state) if run.info.status != "RUNNING" else None
        if artifact is None:
            left.append(TrialSource(number, rid, state, reason=f"{state or 'no state'}: no candidates to pool"))
            continue
        try:
            local = tr.retry(lambda: c.download_artifacts(rid, artifact, str(dest / rid)))
            images, labels, step = read_candidates(local)
        except Exception as exc:  # noqa: BLE001 - one trial's missing file must not lose the others
            why = f"no {artifact}: {' '.join(str(exc).split())[:160]}"
            left.append(TrialSource(number, rid, state, artifact, reason=why))
            continue
        if step < 0:  # a final reconstructions.npz: the trial's last step
            step = int(run.data.metrics.get("train/steps", -1))
        why = _check(images, labels, image_shape)
        if why:
            left.append(TrialSource(number, rid, state, artifact, step, len(labels), why))
            continue
        used.append((TrialSource(number, rid, state, artifact, step, len(labels)), images, labels))
    return used, left


def _logged_union(c, run, work: Path) -> tuple[AttackOutput, list[TrialSource], list[TrialSource]]:
    """The union a search logged (`pooled/reconstructions.npz`, `pooled/pooled.json`), as pooled_candidates."""
    rid = run.info.run_id
    local = tr.retry(lambda: c.download_artifacts(rid, f"{POOLED_DIR}/reconstructions.npz", str(work)))
    with np.load(local, allow_pickle=False) as z:
        images, labels, owner = (torch.from_numpy(z[k]) for k in ("images", "labels", "trial"))
    summary = read_pooled(c, rid) or {}
    used = [TrialSource(**s) for s in summary.get("trials", [])]
    out = AttackOutput(kind="kkt", images=images.float(), labels=labels.long(),
                       settings={"pooled": True, "trials": run.data.tags["tldr.pooled_trials"]},
                       extra={"trial": owner.long(), "trials": [s.number for s in used]})
    return out, used, [TrialSource(**s) for s in summary.get("excluded", [])]


def pooled_candidates(c, search_run_id: str, dest: str | Path | None = None,
                      image_shape: Sequence[int] | None = None, *, logged: bool = True
                      ) -> tuple[AttackOutput, list[TrialSource], list[TrialSource]]:
    """(the union as an AttackOutput, trials used, trials left out) of the search ``search_run_id``: the
    union it logged (``logged``, one file), else read from its trial runs' artifacts, into ``dest``
    (default a temporary folder, removed). Raises ValueError when no trial left candidates."""
    import shutil
    import tempfile

    run = tr.retry(lambda: c.get_run(search_run_id))
    work = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="pooled-"))
    try:
        if logged and "tldr.pooled_risk" in run.data.tags:
            return _logged_union(c, run, work)
        used, left = trial_candidates(c, run.info.experiment_id, search_run_id, work, image_shape)
    finally:
        if dest is None:
            shutil.rmtree(work, ignore_errors=True)
    if not used:
        raise ValueError(f"search run {search_run_id}: no trial left candidates to pool "
                         f"({'; '.join(f'trial {s.number}: {s.reason}' for s in left) or 'no trials'})")
    return pool_candidates([(s.number, x, y) for s, x, y in used]), [s for s, _x, _y in used], left


def pooled_result(c, search_run_id: str, classifier: nn.Module | None, bundle: Any,
                  baselines: Mapping[str, Mapping[str, float]] | None = None, *, tau: float | None = None,
                  seed: int | None = None, logged: bool = True) -> PooledResult:
    """The pooled result of a finished KKT search: the union of its trials' candidates
    (:func:`pooled_candidates`: the one it logged, or with ``logged=False`` read again from the trials)
    scored as one set against ``bundle`` and judged against ``baselines``. Defaults are the search's own:
    baselines from its run's `summary/baselines.json`, tau and seed from its params; with the search's
    classifier and data this gives the numbers it logged. Nothing is logged (:func:`log_pooled` does).
    ``classifier`` is moved to the CPU (label agreement)."""
    import mlflow

    t0 = time.time()
    run = tr.retry(lambda: c.get_run(search_run_id))
    p = run.data.params
    tau = float(p.get("tau", 0.5)) if tau is None else tau
    seed = int(p.get("seed", 0)) if seed is None else seed
    if baselines is None:
        mlflow.set_tracking_uri(c.tracking_uri)
        baselines = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary/baselines.json")
    out, used, left = pooled_candidates(c, search_run_id, image_shape=tuple(bundle.image_shape), logged=logged)
    return score_pool(out, classifier, bundle, baselines, tau=tau, seed=seed, trials=used, excluded=left, t0=t0)


def log_pooled(c, search_run_id: str, res: PooledResult, bundle: Any, work: str | Path) -> None:
    """Log ``res`` once on the search run: metrics `pooled/<score>`, tags `tldr.pooled_risk`,
    `tldr.pooled_criterion`, `tldr.pooled_reason`, `tldr.pooled_trials`, and the artifacts
    `pooled/exposure.csv`, `pooled/exposure.png` (the gallery), `pooled/reconstructions.npz` (the union
    with each candidate's trial) and `pooled/pooled.json` (PooledResult.summary)."""
    import json

    from tldr_core.report.pictures import gallery_title, save_exposure_gallery

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    scored = res.scored
    files = [scored.exposure.write_csv(work / "exposure.csv")]
    if scored.gallery is not None:
        head, tail = gallery_title(scored.gallery).split("\n", 1)  # the first line is already the full width
        title = f"{head}\npooled over trials {res.out.settings['trials']} ({len(res.out.labels)} candidates): {tail}"
        files.append(save_exposure_gallery(work / "exposure.png", scored.gallery, bundle.class_names, title=title))
    np.savez_compressed(work / "reconstructions.npz", images=scored.images.numpy().astype(np.float32),
                        labels=scored.labels.numpy().astype(np.int64), trial=res.out.extra["trial"].numpy())
    files.append(work / "reconstructions.npz")
    for f in files:
        tr.retry(lambda f=f: c.log_artifact(search_run_id, str(f), POOLED_DIR))
    summary = json.loads(json.dumps(res.summary(), default=str))
    tr.retry(lambda: c.log_dict(search_run_id, summary, f"{POOLED_DIR}/pooled.json"))
    tr.log_metrics(c, search_run_id, tr.metric_names(POOLED_DIR, res.metrics), 0)
    tr.set_tags(c, search_run_id, {"tldr.pooled_risk": res.risk.level, "tldr.pooled_criterion": res.risk.criterion,
                                   "tldr.pooled_reason": res.risk.reason[:480],
                                   "tldr.pooled_trials": res.out.settings["trials"]})


def read_pooled(c, search_run_id: str) -> dict[str, Any] | None:
    """The pooled result a search logged (`pooled/pooled.json`: PooledResult.summary), or None when it
    logged none (not a KKT search, an older one, or pooling failed: tag `tldr.pooled_error` says why)."""
    import mlflow

    run = tr.retry(lambda: c.get_run(search_run_id))
    if "tldr.pooled_risk" not in run.data.tags:
        return None
    mlflow.set_tracking_uri(c.tracking_uri)
    return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{POOLED_DIR}/pooled.json")


def pool_search(c, search_run_id: str, classifier: nn.Module | None, bundle: Any,
                baselines: Mapping[str, Mapping[str, float]], *, tau: float, seed: int, work: str | Path) -> str:
    """The driver's step at the end of a KKT search: pool, score and log (:func:`log_pooled`) in ``work``;
    returns the output line, with the seconds it all took. Never raises: a failure is that line and the
    tag `tldr.pooled_error` (the search itself succeeded)."""
    t0 = time.time()
    try:
        out, used, left = pooled_candidates(c, search_run_id, image_shape=tuple(bundle.image_shape), logged=False)
        res = score_pool(out, classifier, bundle, baselines, tau=tau, seed=seed, trials=used, excluded=left, t0=t0)
        log_pooled(c, search_run_id, res, bundle, Path(work) / POOLED_DIR)
        return res.line(time.time() - t0)
    except Exception as exc:  # noqa: BLE001 - the search succeeded; its pooled row is missing, and says why
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        try:
            tr.set_tags(c, search_run_id, {"tldr.pooled_error": why[:480]})
        except Exception:  # noqa: BLE001 - the line still says it
            pass
        return f"pooled: not computed ({why}; {time.time() - t0:.1f} s)"
