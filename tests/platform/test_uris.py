"""Issue 14 finding 10: a bare postgresql:// tracking URI (the k8s form) names a driver that is installed,
instead of failing deep inside MLflow with ModuleNotFoundError: psycopg; errors never show the password."""
from __future__ import annotations

import pytest

from tldr_core.platform.tracking import uris
from tldr_core.platform.tracking.uris import UriError, normalize_tracking_uri, redact

URI = "postgresql://mlflow:s3cret@127.0.0.1:5432/mlflow"


def installed(monkeypatch, *modules):
    monkeypatch.setattr(uris, "_importable", lambda m: m in modules)


def test_sqlalchemy_resolves_a_bare_postgresql_uri_to_psycopg_3():
    assert uris._sqlalchemy_default_driver() == "psycopg"  # SQLAlchemy 2.1: why the rewrite is needed


@pytest.mark.parametrize("have,want", [
    (("psycopg2",), "postgresql+psycopg2://mlflow:s3cret@127.0.0.1:5432/mlflow"),
    (("psycopg", "psycopg2"), URI),  # SQLAlchemy's own choice is installed: unchanged
    (("pg8000",), "postgresql+pg8000://mlflow:s3cret@127.0.0.1:5432/mlflow"),
])
def test_a_bare_postgresql_uri_gets_an_installed_driver(monkeypatch, have, want):
    installed(monkeypatch, *have)
    assert normalize_tracking_uri(URI) == want
    assert normalize_tracking_uri(URI.replace("postgresql://", "postgres://")) == want


def test_an_explicit_driver_and_other_schemes_are_left_alone(monkeypatch):
    installed(monkeypatch)
    for uri in ("postgresql+psycopg://u@h/db", "http://127.0.0.1:5000", "mysql://u@h/db"):
        assert normalize_tracking_uri(uri) == uri


def test_no_driver_at_all_is_one_clear_error_without_the_password(monkeypatch):
    installed(monkeypatch)
    with pytest.raises(UriError) as exc:
        normalize_tracking_uri(URI)
    msg = str(exc.value)
    assert "no PostgreSQL driver is installed" in msg and "pip install" in msg
    assert "s3cret" not in msg and "mlflow:***@127.0.0.1:5432" in msg


def test_the_real_environment_rewrites_to_psycopg2():
    # this venv has psycopg2 and not psycopg (v3): the k8s URI must not need psycopg
    assert normalize_tracking_uri(URI).startswith("postgresql+psycopg2://")


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TLDR_RUNS", raising=False)
    assert normalize_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert normalize_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    assert normalize_tracking_uri("store") == f"file://{tmp_path.resolve() / 'store'}"


@pytest.mark.parametrize("uri,want", [
    ("postgresql://u:p@h:5/d", "postgresql://u:***@h:5/d"),
    ("http://h:5000", "http://h:5000"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
    ("postgresql://u:p@[::1]:5432/d", "postgresql://u:***@[::1]:5432/d"),
])
def test_redact(uri, want):
    assert redact(uri) == want
