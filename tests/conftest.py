"""Shared fixtures: tiny classifiers and data so tests run in seconds on 2 CPU cores."""
from __future__ import annotations

import os

import pytest
import torch

# Keep every framework's temp/cache files inside the test run's own folders.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cnn():
    from tldr_core.models import PaperCNN

    torch.manual_seed(0)
    return PaperCNN((1, 12, 12), 3, width=4, hidden=8).eval().requires_grad_(False)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
