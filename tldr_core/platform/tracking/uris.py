"""Tracking URIs as people type them -> URIs MLflow (and SQLAlchemy under it) can open.

    normalize_tracking_uri(None)                        -> sqlite:////abs/runs/mlflow.db
    normalize_tracking_uri("sqlite:///x.db")            -> sqlite:////abs/x.db   (Ray trials run elsewhere)
    normalize_tracking_uri("store")                     -> file:///abs/store
    normalize_tracking_uri("postgresql://u@db/mlflow")  -> postgresql+psycopg2://u@db/mlflow
                                                           (when SQLAlchemy's default driver is missing)

SQLAlchemy 2.1 resolves a bare ``postgresql://`` (the k8s manifests' form) to psycopg 3; where only
psycopg2 is installed that was ``ModuleNotFoundError: psycopg`` deep inside MLflow. Here the URI
names a driver that is installed, or :class:`UriError` says which one to install. Error text never
carries the password (:func:`redact`).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlsplit

from tldr_core.paths import runs_dir

#: PostgreSQL drivers SQLAlchemy knows, in the order we fall back to them.
PG_DRIVERS = ("psycopg2", "psycopg", "pg8000")


class UriError(ValueError):
    """A tracking URI that cannot be used as given (the message says what to install or change)."""


_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^@/\s]*@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>password|passwd|pwd|secret|token|access_key|secret_key)=[^&\s]+")


def redact(text: object) -> str:
    """`text` with every URI password (`scheme://user:password@`) and password-like query value
    (`?password=...`, `token=...`) replaced by `***`: for anything printed or logged. User names and
    hosts are kept. The one redaction helper: tracking re-exports it."""
    out = _USERINFO.sub(lambda m: f"{m.group('head')}:***@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}=***", out)


def default_tracking_uri() -> str:
    return f"sqlite:///{runs_dir() / 'mlflow.db'}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _sqlalchemy_default_driver() -> str | None:
    """The DBAPI module SQLAlchemy picks for a bare ``postgresql://`` (without importing it)."""
    try:
        from sqlalchemy.engine.url import make_url

        return make_url("postgresql://").get_dialect().driver
    except Exception:  # noqa: BLE001 - no SQLAlchemy: MLflow's own error will say so
        return None


def with_db_driver(uri: str) -> str:
    """A ``postgres(ql)://`` URI without a driver -> one naming an installed driver; other URIs unchanged."""
    scheme = urlsplit(uri).scheme
    if scheme not in ("postgres", "postgresql"):
        return uri
    rest = uri.split("://", 1)[1]
    default = _sqlalchemy_default_driver()
    if default and _importable(default):
        return f"postgresql://{rest}"
    for driver in PG_DRIVERS:
        if _importable(driver):
            return f"postgresql+{driver}://{rest}"
    raise UriError(f"tracking URI {redact(uri)}: no PostgreSQL driver is installed (SQLAlchemy would use "
                   f"{default or 'psycopg'}); install one: pip install 'psycopg[binary]' (or psycopg2-binary)")


def normalize_tracking_uri(uri: str | None) -> str:
    """The default store for None; absolute sqlite/file paths; an installed driver for PostgreSQL URIs."""
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return "file://" + str(Path(uri).resolve())
    return with_db_driver(uri)
