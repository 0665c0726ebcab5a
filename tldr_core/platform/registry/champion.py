"""Moving the registry's ``champion`` alias: the rule, and setting it without races.

The rule (:func:`champion_decision`): a generator version becomes the champion when

- no version holds the alias; or
- the holder attacks the same classifier checkpoint on the same objective (it is *comparable*) and the
  candidate scores higher than it and than every other comparable version; or
- the holder attacks another classifier or objective, the candidate was registered later than the
  holder (a higher version number: the newer audit), and it beats every comparable version.

So re-promoting an older search never moves the alias back: a worse comparable version loses on
its score, an older registration for another classifier loses on its age.

Setting it (:func:`claim_champion`) reads the holder and the versions, decides and sets the alias
while holding a file lock beside a local store (sqlite or file), so concurrent promotions are
decided one after another, each seeing the other's version. A remote store (HTTP, PostgreSQL) has
no shared file to lock: there the alias is re-read after setting it, and when a comparable version
that scores higher is found (registered concurrently), the alias is moved to it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from tldr_core.locks import FileLock, LockBusy
from tldr_core.platform.tracking import store as tr

CHAMPION = "champion"
LOCK_TIMEOUT_S = 120.0


class PromotionLockError(RuntimeError):
    """Another promotion held the store's lock for longer than LOCK_TIMEOUT_S."""


def _float(s: Any) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def lock_path(tracking_uri: str) -> Path | None:
    """Where promotions on this store lock: beside a sqlite database or in a file store; None if remote."""
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        return Path(tracking_uri[len("sqlite:///"):] + ".promotion.lock")
    if parts.scheme in ("file", ""):
        return Path(parts.path or tracking_uri) / ".promotion.lock"
    return None


@contextmanager
def promotion_lock(tracking_uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[FileLock | None]:
    """An exclusive lock for one promotion on a local store (waits up to ``timeout``); a no-op if remote."""
    path = lock_path(tracking_uri)
    if path is None:
        yield None
        return
    os.makedirs(path.parent, exist_ok=True)
    try:
        lock = FileLock(path).acquire(timeout=timeout)
    except LockBusy:
        raise PromotionLockError(f"another promotion has held {path} for over {timeout:.0f} s") from None
    try:
        yield lock
    finally:
        lock.release()


def comparable(v, clf: dict[str, str], objective: str) -> bool:
    """Does version ``v`` attack the same classifier checkpoint on the same objective (with a value)?"""
    return (v.tags.get("classifier_sha256") == clf["classifier_sha256"] and v.tags.get("objective") == objective
            and _float(v.tags.get("objective_value")) is not None)


def best_comparable(versions: list, version: str | None, clf: dict[str, str], objective: str):
    """The best version other than ``version`` attacking the same classifier on the same objective, or None."""
    others = [v for v in versions if str(v.version) != version and comparable(v, clf, objective)]
    return max(others, key=lambda v: _float(v.tags["objective_value"]), default=None)


def champion_decision(name: str, version: str, value: float, holder, incumbent, clf: dict[str, str],
                      objective: str) -> tuple[bool, str]:
    """(promoted, reason) by the module's rule. ``incumbent``: the best other comparable version (or None);
    ``holder``: the version holding the alias now (any classifier/objective), or None."""
    if holder is not None and str(holder.version) == version:
        return True, f"version {version} already is the champion"
    if holder is not None and not comparable(holder, clf, objective) and int(holder.version) > int(version):
        return False, (f"version {version} is older than the champion, version {holder.version} (classifier v"
                       f"{holder.tags.get('classifier_version', '?')} / objective {holder.tags.get('objective', '?')}):"
                       " an older registration does not take the alias back; it stays a version without it")
    if incumbent is None:
        reason = (f"no earlier {name} version attacks classifier {clf['classifier_name']} v{clf['classifier_version']} "
                  f"on {objective}: version {version} ({objective} {value:.4f}) becomes the champion")
        if holder is not None:
            reason += (f" (replacing version {holder.version}, which attacks classifier v"
                       f"{holder.tags.get('classifier_version', '?')} / objective {holder.tags.get('objective', '?')})")
        return True, reason
    inc_value = _float(incumbent.tags["objective_value"])
    if value > inc_value:
        return True, (f"version {version} beats the champion for this classifier and objective, version "
                      f"{incumbent.version}: {objective} {value:.4f} > {inc_value:.4f}")
    return False, (f"version {version} does not beat the champion for this classifier and objective, version "
                   f"{incumbent.version}: {objective} {value:.4f} <= {inc_value:.4f}; it stays a version "
                   f"without the alias")


def versions(c, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(tr.retry(lambda: c.search_model_versions(f"name = '{name}'")))
    except MlflowException:
        return []


def holder(c, name: str):
    """The version the champion alias points to now, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def claim_champion(c, name: str, version: str, value: float, clf: dict[str, str], objective: str
                   ) -> tuple[bool, str, str | None]:
    """Decide and (if promoted) set the alias against the store's state at that moment, under the store's
    promotion lock; then check for a better concurrent comparable version (remote stores).
    Returns (promoted, reason, the version holding the alias afterwards)."""
    with promotion_lock(c.tracking_uri):
        current = holder(c, name)
        incumbent = best_comparable(versions(c, name), version, clf, objective)
        promoted, reason = champion_decision(name, version, value, current, incumbent, clf, objective)
        if promoted and (current is None or str(current.version) != version):
            tr.retry(lambda: c.set_registered_model_alias(name, CHAMPION, version))
    if promoted:
        better = best_comparable(versions(c, name), version, clf, objective)
        now = holder(c, name)
        if (better is not None and _float(better.tags["objective_value"]) > value and now is not None
                and str(now.version) == version):
            tr.retry(lambda: c.set_registered_model_alias(name, CHAMPION, str(better.version)))
            promoted = False
            reason += (f"; then version {better.version}, registered meanwhile, scored higher "
                       f"({better.tags['objective_value']}) and took the alias")
    now = holder(c, name)
    return promoted, reason, str(now.version) if now is not None else None
