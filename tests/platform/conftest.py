"""Fixtures of the platform tests: one tiny real search shared by the modules that read it back."""
from __future__ import annotations

import pytest
import yaml

from search_helpers import TINY, run_search
from tldr_core.platform.search.spaces.load import DEFAULT_SPACE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, cache_dir):
    """A tiny search of four trials: the first (an initial point with ce = 1e308) fails with a non-finite loss,
    the second's worker is killed before it opens its run (SIGKILL, TLDR_TEST_KILL_TRIAL), two run.
    One search for both failures: each search costs ~30 s of the suite."""
    root = tmp_path_factory.mktemp("smoke")
    space = yaml.safe_load(DEFAULT_SPACE.read_text())
    space["initial_points"] = [{"variant": "label", "ce": 1.0e308}]
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    proc = run_search(root / "runs", cache_dir, [*TINY, "--trials", "4", "--space", str(root / "space.yaml")],
                      {"TLDR_TEST_KILL_TRIAL": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs", proc
