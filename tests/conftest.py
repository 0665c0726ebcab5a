"""Shared fixtures: tiny classifiers and data so tests run in seconds on 2 CPU cores."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

# Keep every framework's temp/cache files inside the test run's own folders.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# one torch thread per xdist worker (make test runs two on the 2-core CI machine), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_configure(config):
    """On the main process: the session's blank MLflow store (tests/blank_store.py) and, under xdist,
    the file of the workers' groups (tests/xdist_groups.py); the workers inherit both variables."""
    if not hasattr(config, "workerinput"):
        import tempfile

        import blank_store
        import xdist_groups

        # Nothing a test runs in-process writes into the checkout: Ray sessions, caches and searches go to a
        # folder of this session's own (tests that need another TLDR_RUNS set it). In ./runs a test's Ray
        # logs landed in the tree that the read-only-audit test watches, and failed it when run beside it.
        if not os.environ.get("TLDR_RUNS"):
            os.environ["TLDR_RUNS"] = config._tldr_runs = tempfile.mkdtemp(prefix="tldr-tests-")
        config._tldr_blank_store = blank_store.start()
        config._tldr_xdist_groups = xdist_groups.start(config)


def pytest_unconfigure(config):
    if getattr(config, "_tldr_runs", None):
        shutil.rmtree(config._tldr_runs, ignore_errors=True)
    store = getattr(config, "_tldr_blank_store", None)
    if store is not None:
        store.stop()
    groups = getattr(config, "_tldr_xdist_groups", None)
    if groups is not None:
        shutil.rmtree(groups, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after deselection, and after xdist names marked groups (pytest < 9)
def pytest_collection_modifyitems(config, items):
    """On xdist's workers with --dist loadgroup (make test): tests/xdist_groups.py's groups and order."""
    if hasattr(config, "workerinput") and config.getoption("loadgroup", False):
        import xdist_groups

        xdist_groups.group_and_order(items)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist does not know it
def pytest_xdist_make_scheduler(config, log):
    import xdist_groups

    if getattr(config, "_tldr_xdist_groups", None) is not None:
        return xdist_groups.make_scheduler(config, log)
    return None


@pytest.fixture
def tiny_cnn():
    from tldr_core.attack.models import PaperCNN

    torch.manual_seed(0)
    return PaperCNN((1, 12, 12), 3, width=4, hidden=8).eval().requires_grad_(False)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLDR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the CI machine has 2 shared cores, and more threads per test process only thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_case():
    """(bundle, classifier, AttackConfig): 50 8x8 digits, an untrained MLP, a 3-step attack config,
    shared by the pipeline and artifact tests (one per test module: tests may move the model)."""
    from tldr_core.attack.config import AttackConfig
    from tldr_core.attack.data import load_dataset
    from tldr_core.attack.models import MLP

    bundle = load_dataset("digits-8x8", 50, seed=0, test_size=60)
    torch.manual_seed(0)
    clf = MLP(bundle.image_shape, bundle.num_classes).eval()
    cfg = AttackConfig(steps=3, per_class=2, batch_size=8, device="cpu", seed=5)
    return bundle, clf, cfg
