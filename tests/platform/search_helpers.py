"""Running real (tiny) searches in tests: `tune/search.py` in a process of its own with its own runs folder,
and reading the results back through the MLflow client. Shared by the search test modules (imported
by name: pytest puts this folder on sys.path) and the fixtures in this folder's conftest.py."""
from __future__ import annotations

import os
import re
from pathlib import Path

from cli_process import run_python

from tldr_core.platform.tracking import store as tr

REPO = Path(__file__).resolve().parents[2]
SEARCH = REPO / "tune" / "search.py"
REAUDIT = REPO / "tune" / "reaudit.py"
TINY = ["--smoke-test", "--trials", "3", "--steps", "8", "--train-size", "100", "--per-class", "3"]


def run_search(runs: Path, cache: Path, args: list[str], extra_env: dict[str, str] | None = None,
               script: Path = SEARCH):
    """`script` (tune/search.py) run from the runs folder's parent, so a stray ./mlruns would show there
    (forked from the suite's server, tests/cli_process.py: its result reads like subprocess.run's)."""
    env = {**os.environ, "TLDR_RUNS": str(runs), "TLDR_CACHE": str(cache), "RAY_AUTH_MODE": "disabled",
           **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    runs.parent.mkdir(parents=True, exist_ok=True)
    return run_python([script, *args], cwd=runs.parent, env=env, timeout=600)


def client_of(runs: Path, experiment: str = "tldr-mnist-bundled"):
    """(MlflowClient of the runs folder's sqlite store, the experiment's id)."""
    c = tr.client(f"sqlite:///{runs / 'mlflow.db'}")
    return c, c.get_experiment_by_name(experiment).experiment_id


def searches_of(c, exp: str) -> list:
    return c.search_runs([exp], f"tags.`{tr.ROLE}` = 'search'", order_by=["attributes.start_time ASC"])


def done_counts(stdout: str) -> list[tuple[int, int]]:
    """Every "(k/M done)" of the progress lines, as (k, M)."""
    return [(int(a), int(b)) for a, b in re.findall(r"\((\d+)/(\d+) done\)", stdout)]
