"""Issue 24 #8: two searches started together on one fresh store registered the same classifier twice
(versions 1 and 2, one sha256). Registration is idempotent under concurrency: the look-up and the
registration hold the store's registry lock (local stores), and on a store without one the first
registration of a file wins and a concurrent duplicate is deleted."""
from __future__ import annotations

import threading

import pytest
import torch

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
from tldr_core.attack.models import MLP
from tldr_core.platform.registry import champion as ch
from tldr_core.platform.registry import models as rg
from tldr_core.platform.tracking import store as tr

pytestmark = pytest.mark.slow  # an MLflow database and model logging

DATASET = "toy-race"


def _race(tmp_path, monkeypatch) -> tuple[list[str], list]:
    """Search A is logging the classifier when search B registers the same file; (refs' versions, live versions)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tr.client(uri)
    exp = tr.ensure_experiment(c, "race", tmp_path / "mlartifacts")
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "clf.pt", MLP((1, 4, 4), 2, hidden=4), CLASSIFIER_FORMAT, {})
    runs = [c.create_run(exp).info.run_id for _ in range(2)]
    refs: dict[str, str] = {}
    real_log = rg.log_checkpoint_model
    started = threading.Event()

    def b() -> None:
        refs["b"] = rg.register_classifier(tr.client(uri), runs[1], path, DATASET, {}).version

    other = threading.Thread(target=b)

    def log_while_b_registers(*args, **kw):
        if not started.is_set():  # A's first call: B starts now, and gets as far as it can in 10 s
            started.set()
            other.start()
            other.join(timeout=10)
        return real_log(*args, **kw)

    monkeypatch.setattr(rg, "log_checkpoint_model", log_while_b_registers)
    refs["a"] = rg.register_classifier(c, runs[0], path, DATASET, {}).version
    other.join(timeout=120)
    return [refs["a"], refs["b"]], rg.model_versions(c, "tldr-classifier-" + DATASET)


def test_two_registrations_at_once_give_one_version(tmp_path, monkeypatch):
    refs, live = _race(tmp_path, monkeypatch)
    assert refs == ["1", "1"] and [str(v.version) for v in live] == ["1"]


def test_without_a_lock_the_duplicate_is_deleted_and_both_name_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(ch, "lock_path", lambda uri: None)  # a remote store: nothing to lock
    refs, live = _race(tmp_path, monkeypatch)
    assert refs == ["1", "1"] and [str(v.version) for v in live] == ["1"]  # B registered 1 first; A's 2 is gone
