"""Issue 14 finding 7: the champion alias is decided against the store's state at the moment it is set.
Re-promoting an older version never moves it back, and two promotions at once end on the better one
(file lock on a local store; re-check and repair where there is no lock). Versions are created
directly (no search needed): promote() hands its version to the same claim_champion."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from tldr_core.platform.registry import champion as ch
from tldr_core.platform.tracking import store as tr

CLF1 = {"classifier_name": "tldr-classifier-toy", "classifier_version": "1", "classifier_sha256": "a" * 64}
CLF2 = {"classifier_name": "tldr-classifier-toy", "classifier_version": "2", "classifier_sha256": "b" * 64}


def mv(version, value, clf=CLF1, objective="quality"):
    return SimpleNamespace(version=str(version), tags={**clf, "objective": objective, "objective_value": repr(value)})


@pytest.mark.parametrize("holder,incumbent,value,promoted,needle", [
    (None, None, 0.1, True, "becomes the champion"),
    (mv(1, 0.5), mv(1, 0.5), 0.6, True, "0.6000 > 0.5000"),
    (mv(1, 0.5), mv(1, 0.5), 0.4, False, "does not beat"),
    (mv(5, 0.05, CLF2), None, 0.9, False, "older than the champion, version 5 (classifier v2"),  # re-promoting v3
    (mv(2, 0.05, CLF2), None, 0.1, True, "replacing version 2"),  # a newer audit of classifier 1
    (mv(2, 0.05, CLF2), mv(1, 0.5), 0.45, False, "does not beat"),
    (mv(3, 0.5), mv(3, 0.5), 0.5, True, "already is the champion"),
])
def test_the_rule(holder, incumbent, value, promoted, needle):
    version = "3"
    got, reason = ch.champion_decision("g", version, value, holder, incumbent, CLF1, "quality")
    assert got is promoted and needle in reason, reason


def test_locks_live_beside_local_stores_only(tmp_path):
    assert ch.lock_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db.promotion.lock"
    assert ch.lock_path(f"file://{tmp_path}/store") == tmp_path / "store" / ".promotion.lock"
    assert ch.lock_path("http://127.0.0.1:5000") is None and ch.lock_path("postgresql+psycopg2://u@h/db") is None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    c = tr.client(f"sqlite:///{root / 'mlflow.db'}")
    exp = tr.ensure_experiment(c, "tldr-champion-test", root / "artifacts")
    (root / "model").mkdir()
    return SimpleNamespace(c=c, run=c.create_run(exp).info.run_id, source=str(root / "model"))


@pytest.fixture
def name(store, request):
    """A registered model of its own per test."""
    n = f"tldr-generator-{request.node.name.replace('[', '-').replace(']', '')}"
    store.c.create_registered_model(n)
    return n


def register(store, name, value, clf=CLF1) -> str:
    tags = {**clf, "objective": "quality", "objective_value": repr(value)}
    return str(store.c.create_model_version(name, source=store.source, run_id=store.run, tags=tags).version)


def holder(store, name) -> str | None:
    h = ch.holder(store.c, name)
    return None if h is None else str(h.version)


@pytest.mark.slow
def test_re_promoting_an_older_version_never_moves_the_alias_back(store, name):
    claim = lambda v, value, clf=CLF1: ch.claim_champion(store.c, name, v, value, clf, "quality")  # noqa: E731
    worse = register(store, name, 0.3)
    assert claim(worse, 0.3)[0]
    better = register(store, name, 0.5)
    assert claim(better, 0.5)[0] and holder(store, name) == better
    promoted, reason, now = claim(worse, 0.3)  # the older, worse search promoted again
    assert not promoted and now == better and "does not beat" in reason
    other = register(store, name, 0.05, CLF2)  # a newer audit of another classifier takes the alias
    assert claim(other, 0.05, CLF2)[0] and holder(store, name) == other
    promoted, reason, now = claim(better, 0.5)  # the older classifier's best cannot take it back
    assert not promoted and now == other and "older than the champion" in reason


def _race(store, name, monkeypatch, claim) -> tuple[str, str]:
    """Worse (0.2) decides first and is slow to set the alias; better (0.7) is registered and claims
    meanwhile. Returns (worse, better) versions."""
    decided, better_done = threading.Event(), threading.Event()
    real = ch.champion_decision
    worse = register(store, name, 0.2)
    versions = {"worse": worse}

    def slow_decision(n, version, *args):
        out = real(n, version, *args)
        if version == worse:
            decided.set()
            better_done.wait(3)  # with the lock, better waits for us instead: go on after 3 s
        return out

    monkeypatch.setattr(ch, "champion_decision", slow_decision)

    def run_better():
        decided.wait(30)
        versions["better"] = register(store, name, 0.7)
        try:
            claim(versions["better"], 0.7)
        finally:
            better_done.set()

    threads = [threading.Thread(target=claim, args=(worse, 0.2)), threading.Thread(target=run_better)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return worse, versions["better"]


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["local (file lock)", "remote (re-check after setting)"])
def test_two_promotions_at_once_end_on_the_better_version(store, name, monkeypatch, store_kind):
    if store_kind.startswith("remote"):
        monkeypatch.setattr(ch, "lock_path", lambda uri: None)
    claim = lambda v, value: ch.claim_champion(store.c, name, v, value, CLF1, "quality")  # noqa: E731
    worse, better = _race(store, name, monkeypatch, claim)
    assert holder(store, name) == better != worse


@pytest.mark.slow
def test_the_race_is_real_without_lock_and_re_check(store, name, monkeypatch):
    """The same schedule with the old last-writer-wins promotion ends on the worse version."""
    def last_writer_wins(v, value):
        incumbent = ch.best_comparable(ch.versions(store.c, name), v, CLF1, "quality")
        promoted, _ = ch.champion_decision(name, v, value, ch.holder(store.c, name), incumbent, CLF1, "quality")
        if promoted:
            store.c.set_registered_model_alias(name, ch.CHAMPION, v)

    worse, better = _race(store, name, monkeypatch, last_writer_wins)
    assert holder(store, name) == worse != better
