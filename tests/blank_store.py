"""One schema-only MLflow sqlite file per test session, which every new store of the session starts as a
copy of (tldr_core.platform.tracking.store.BLANK_STORE_ENV): MLflow's ~60 schema migrations took 3-6 s
for each of the suite's many new stores, and the copy is what they would have made (MLflow still adds
the Default experiment and checks the schema's revision when it opens the copy).

Made in the background by MLflow itself (`mlflow db upgrade` on an empty file) while the first tests run;
a store made before the file is there is made the slow way. Used by tests/conftest.py; a test that must
see MLflow create a store from nothing drops the variable (`without_blank_store`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tldr_core.platform.tracking.store import BLANK_STORE_ENV

_MAKE = """
import os, sys
from mlflow.db import upgrade  # `mlflow db upgrade URL`: on an empty database, MLflow's own schema creation
part = sys.argv[1] + ".part"
upgrade.main([f"sqlite:///{part}"], standalone_mode=False)
os.replace(part, sys.argv[1])  # whole or not at all: a store never copies half a file
"""


class BlankStore:
    """The background `mlflow db upgrade` and the folder of its file; `stop()` ends and removes both."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tldr-blank-store-"))
        self.path = self.folder / "blank.db"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.proc = subprocess.Popen([sys.executable, "-c", _MAKE, str(self.path)], cwd=self.folder, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def start() -> BlankStore | None:
    """Start making the session's blank store and point BLANK_STORE_ENV at it (inherited by every
    process the tests start); None when the variable is already set (a caller's own file)."""
    if os.environ.get(BLANK_STORE_ENV):
        return None
    store = BlankStore()
    os.environ[BLANK_STORE_ENV] = str(store.path)
    return store


def without_blank_store(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without BLANK_STORE_ENV: MLflow creates new stores itself."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != BLANK_STORE_ENV}
