"""Reference models trained as Ray tasks (tldr_core.platform.references): in order, cached, reused
without Ray by a second call; the membership stage on top of them."""
from __future__ import annotations

import pytest
import torch

from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.data import load_dataset
from tldr_core.attack.reference_models import load_or_train_reference, reference_cache_path
from tldr_core.platform import references as refs_mod
from tldr_core.platform.references import membership_stage, train_references

SETTINGS = ClassifierSettings(arch="mlp", epochs=3, hidden=16, batch_size=32, seed=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits-8x8", 50, seed=0)  # T, H' 5 per class; P = the other 1,697 digits


@pytest.mark.slow
def test_two_references_on_ray_then_from_the_cache(digits, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("TLDR_RUNS", str(tmp_path / "runs"))  # Ray's session and worker temp files go there
    lines: list[str] = []
    got = train_references(digits, SETTINGS, 2, cache_dir=tmp_path, num_cpus=2, log=lines.append)
    assert [r.k for r in got] == [0, 1] and not any(r.cached for r in got)
    assert any("2/2 trained" in s for s in lines) and not ray.is_initialized()  # started here, so shut down
    paths = [reference_cache_path(digits, SETTINGS, k, tmp_path) for k in (0, 1)]
    assert [r.path for r in got] == paths and all(p.exists() for p in paths)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    # what the Ray task trained is what the attack-layer function gives (and finds cached)
    x = digits.train.images[:7]
    for r in got:
        model, meta, path = load_or_train_reference(digits, SETTINGS, r.k, cache_dir=tmp_path, log=lambda _: None)
        assert path == r.path and torch.equal(model(x), r.model(x)) and meta["dataset"] == f"digits-8x8-ref{r.k}"

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started although every reference is cached")

    monkeypatch.setattr(refs_mod, "_start_ray", no_ray)
    lines.clear()
    again = train_references(digits, SETTINGS, 2, cache_dir=tmp_path, log=lines.append)
    assert all(r.cached for r in again) and [p.stat().st_mtime_ns for p in paths] == mtimes
    assert any("2 of 2 found in the cache" in s for s in lines)
    assert all(torch.equal(a.model(x), b.model(x)) for a, b in zip(got, again))
    # the membership stage on the cached references: LiRA with K = 2, pooled variance
    res = membership_stage(got[0].model, digits, SETTINGS, k=2, cache_dir=tmp_path, n_boot=20, log=lines.append)
    assert res.best == "lira" and res.lira_k == 2 and res.lira_fixed_variance
    assert res.train_index.numel() == 50 and res.heldout_index.numel() == 50


def test_stage_without_references_and_k_1_refused(digits, tmp_path):
    torch.manual_seed(0)
    model, _, _ = load_or_train_reference(digits, SETTINGS, 5, cache_dir=tmp_path, log=lambda _: None)
    res = membership_stage(model, digits, SETTINGS, k=0, cache_dir=tmp_path, n_boot=20, log=lambda _: None)
    assert res.best == "margin" and "lira" not in res.summaries and res.lira_k == 0
    with pytest.raises(ValueError, match="at least 2 reference"):
        membership_stage(model, digits, SETTINGS, k=1, cache_dir=tmp_path, log=lambda _: None)
