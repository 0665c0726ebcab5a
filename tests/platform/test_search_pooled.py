"""Tests of tldr_core.platform.search.pooled on constructed trial outputs (random 16x16 textures, whose
pairwise SSIM stays below ~0.31, so an exact copy of a training image is the only thing that reaches
it): the union exposes what each trial exposes, scored against the same H' and population, and the
choice of trials by state from their runs (a stand-in client; the real MLflow path is the smoke KKT
search in test_search_kkt.py)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tldr_core.attack.data import Split
from tldr_core.platform.search.pooled import (EVALUATED_NPZ, FINAL_NPZ, pool_candidates, pool_search, score_pool,
                                              trial_candidates)
from tldr_core.platform.tracking import store as tr
from tldr_core.scoring.exact_test import fisher_greater
from tldr_core.scoring.ssim import ssim_matrix

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINES = {"noise": {"quality": 0.1}, "class_mean": {"quality": 0.5}}


def _textures(n: int, seed: int, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, side, side, generator=g) + 0.05 * torch.randn(n, 1, side, side, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def bundle():
    """3 classes x 20 training, 20 held-out (H' = all of them) and 30 population images."""
    lab = lambda n: torch.arange(3).repeat_interleave(n)  # noqa: E731
    return SimpleNamespace(name="textures", train=Split(_textures(60, 1), lab(20)),
                           heldout=Split(_textures(60, 2), lab(20)), test=Split(_textures(90, 3), lab(30)),
                           num_classes=3, image_shape=(1, 16, 16), class_names=["a", "b", "c"])


def _trial(bundle, copied: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noise candidates per class, then exact copies of the training images `copied`."""
    noise, noise_y = _textures(6, seed), torch.arange(3).repeat_interleave(2)
    return (torch.cat([noise, bundle.train.images[copied]]),
            torch.cat([noise_y, bundle.train.labels[copied]]))


def _score(bundle, parts):
    return score_pool(pool_candidates(parts), None, bundle, BASELINES, seed=0)


def test_the_union_exposes_what_each_trial_exposes_against_the_same_heldout(bundle):
    # noise seeds without a chance exposure (about 0.6 expected per set at 1 % FPR; e.g. seed 10 adds #40)
    a, b = _trial(bundle, [3], 11), _trial(bundle, [7], 15)
    alone_a, alone_b = _score(bundle, [(1, *a)]), _score(bundle, [(2, *b)])
    pooled = _score(bundle, [(1, *a), (2, *b)])
    ea, eb, ep = alone_a.scored.exposure, alone_b.scored.exposure, pooled.scored.exposure
    assert ea.exposed_index.tolist() == [3] and eb.exposed_index.tolist() == [7]
    assert sorted(ep.exposed_index.tolist()) == [3, 7]
    # per image the best candidate over both trials: the union's exposure is the larger of the two,
    # for T and for H' alike (H' is scored against the same union, so its threshold rises with it)
    assert torch.allclose(ep.e_train, torch.maximum(ea.e_train, eb.e_train), atol=1e-6)
    assert torch.allclose(ep.e_heldout, torch.maximum(ea.e_heldout, eb.e_heldout), atol=1e-6)
    assert ep.threshold == pytest.approx(float(ep.e_heldout.max()))  # k = floor(1 % x 60) = 0: the top H' score
    assert ep.threshold >= max(ea.threshold, eb.threshold)
    # hand: an exact copy's calibrated exposure is 1 minus the copy's best population match of its class
    pop = bundle.test
    for t in (3, 7):
        best_pop = ssim_matrix(bundle.train.images[[t]], pop.images[pop.labels == 0]).double().max()
        assert float(ep.e_train[t]) == pytest.approx(1 - float(best_pop), abs=1e-5)
    # which trial each candidate came from, and who reached what
    assert pooled.out.extra["trial"].tolist() == [1] * 7 + [2] * 7
    assert int(pooled.out.extra["trial"][ep.best_recon_train[3]]) == 1
    assert int(pooled.out.extra["trial"][ep.best_recon_train[7]]) == 2
    contrib = pooled.contributions()
    assert contrib[1]["exposed"] == 1 and contrib[2]["exposed"] == 1
    assert contrib[1]["best"] + contrib[2]["best"] == 60  # every class has candidates
    m = pooled.metrics
    assert (m["candidates"], m["trials"], m["n_recon"], m["exposed_count"]) == (14, 2, 14, 2)
    assert m["matched_train_060"] == 2 and m["matched_heldout_060"] == 0
    assert pooled.summary()["contributions"]["1"] == contrib[1]


def test_pooling_turns_two_partial_recoveries_into_per_image_evidence(bundle):
    """4 copies per trial are below the 5 images HIGH needs; their union (8 vs 0 held-out images at
    SSIM >= 0.6, Fisher p = C(60,8)/C(120,8) = 0.0030) is HIGH by the one-to-one matches."""
    a, b = _trial(bundle, [3, 25, 47, 50], 10), _trial(bundle, [7, 28, 44, 55], 11)
    alone = [_score(bundle, [(1, *a)]), _score(bundle, [(2, *b)])]
    pooled = _score(bundle, [(1, *a), (2, *b)])
    for r in alone:
        assert r.metrics["matched_train_060"] == 4 and r.risk.level != "HIGH"
    m = pooled.metrics
    assert (m["matched_train_060"], m["matched_heldout_060"]) == (8, 0)
    hand = math.comb(60, 8) / math.comb(120, 8)
    assert m["matched_p_060"] == pytest.approx(hand, rel=1e-9) and hand == pytest.approx(0.003045, abs=1e-6)
    assert fisher_greater(8, 60, 0, 60) == pytest.approx(hand, rel=1e-9)
    assert pooled.risk.level == "HIGH" and pooled.risk.criterion in ("exposure", "matches")
    assert "verdict HIGH" in pooled.line(1.25) and pooled.line(1.25).endswith("; 1.2 s")


def test_pool_candidates_keeps_order_and_refuses_nothing():
    x = torch.rand(2, 1, 4, 4)
    out = pool_candidates([(5, x, torch.tensor([0, 1])), (2, x[:1], torch.tensor([1]))])
    assert out.kind == "kkt" and out.labels.tolist() == [0, 1, 1] and out.extra["trial"].tolist() == [5, 5, 2]
    assert out.settings["trials"] == "5,2" and torch.equal(out.images[2], x[0])
    with pytest.raises(ValueError, match="no trial with candidates"):
        pool_candidates([])


# ------------------------------------------------------------------ which trials (a stand-in client)

class _Page(list):
    token = None


class FakeClient:
    """What trial_candidates and pool_search call: search_runs, download_artifacts, get_run, log_batch."""

    def __init__(self, runs: list, files: dict[tuple[str, str], Path]) -> None:
        self.runs, self.files, self.tags = runs, files, {}

    def search_runs(self, *args, **kwargs):
        return _Page(self.runs)

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        if (run_id, path) not in self.files:
            raise OSError(f"no such artifact {path}")
        return str(self.files[run_id, path])

    def get_run(self, run_id: str):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id="0"), data=SimpleNamespace(tags={}))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()):
        self.tags.update({t.key: t.value for t in tags})


def _run(number: int, state: str, status: str = "FINISHED", steps: float | None = None):
    metrics = {} if steps is None else {"train/steps": steps}
    return SimpleNamespace(info=SimpleNamespace(run_id=f"r{number}", status=status),
                           data=SimpleNamespace(tags={tr.TRIAL_NUMBER: str(number), tr.STATE: state}, metrics=metrics))


def _npz(path: Path, images, labels, step: int | None = None) -> Path:
    extra = {} if step is None else {"step": np.int64(step)}
    np.savez(path, images=images.numpy(), labels=labels.numpy(), **extra)
    return path


def test_finished_and_early_stopped_trials_are_pooled_failed_ones_are_not(tmp_path):
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    runs = [_run(3, "failed", "FAILED"), _run(1, "finished", steps=8), _run(2, "early-stopped"),
            _run(4, "finished", steps=8), _run(5, "finished", steps=8), _run(6, "finished", "RUNNING"),
            _run(7, "early-stopped")]
    files = {("r1", FINAL_NPZ): _npz(tmp_path / "1.npz", x, y),
             ("r2", EVALUATED_NPZ): _npz(tmp_path / "2.npz", x, y, 4),
             ("r5", FINAL_NPZ): _npz(tmp_path / "5.npz", bad, y), ("r3", FINAL_NPZ): _npz(tmp_path / "3.npz", x, y),
             ("r7", EVALUATED_NPZ): _npz(tmp_path / "7.npz", x[:, :, :4], y, 2)}
    used, left = trial_candidates(FakeClient(runs, files), "0", "parent", tmp_path, image_shape=(1, 8, 8))
    assert [(s.number, s.state, s.artifact, s.step, s.candidates) for s, _x, _y in used] == [
        (1, "finished", FINAL_NPZ, 8, 4), (2, "early-stopped", EVALUATED_NPZ, 4, 4)]
    assert torch.equal(used[0][1], x) and torch.equal(used[1][2], y)
    why = {s.number: s.reason for s in left}
    assert sorted(why) == [3, 4, 5, 6, 7]
    assert why[3] == "failed: no candidates to pool" and why[6].endswith("no candidates to pool")
    assert why[4].startswith(f"no {FINAL_NPZ}: no such artifact") and why[5] == "non-finite candidates"
    assert why[7] == "candidates of shape (1, 4, 8), not (1, 8, 8)"


def test_pool_search_never_raises_and_says_why(tmp_path, bundle):
    c = FakeClient([_run(1, "failed", "FAILED")], {})
    line = pool_search(c, "parent", None, bundle, BASELINES, tau=0.5, seed=0, work=tmp_path)
    assert line.startswith("pooled: not computed (ValueError: search run parent: no trial left candidates")
    assert "trial 1: failed: no candidates to pool" in line and line.endswith(" s)")
    assert c.tags["tldr.pooled_error"].startswith("ValueError: search run parent")
