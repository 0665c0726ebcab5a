"""A trial given a GPU share runs on CUDA with its memory capped at that share, or fails; never falls back to CPU."""
from types import SimpleNamespace

import pytest
import torch

from tldr_core.platform.search.trial_inputs import trial_device


def _inputs(gpus):
    return SimpleNamespace(settings={"gpus_per_trial": gpus})


def test_no_gpu_share_runs_on_cpu():
    assert trial_device(_inputs(0)) == "cpu"


def test_gpu_share_without_cuda_is_an_error_not_a_cpu_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device.*--gpus-per-trial 0"):
        trial_device(_inputs(0.25))


@pytest.mark.parametrize("gpus, cap", [(0.25, [(0.25, 0)]), (1, []), (2, [])])
def test_fractional_share_caps_the_trials_cuda_memory(monkeypatch, gpus, cap):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert trial_device(_inputs(gpus)) == "cuda"
    assert calls == cap
