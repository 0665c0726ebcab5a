"""Hostile inputs to the platform CLIs (issue 14), as data: search-space YAMLs (through the re-audit, which
checks the space before touching any store, and a few through the search itself) and tracking URIs
(through the registry CLI). Each must be refused with exit status 2 and one ``error:`` line, no
traceback (probe_runner.py); URI errors never show the password."""
from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_runner import REPO, check_refused, run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # one Python process per probe

BASE = (REPO / "tldr_core" / "platform" / "search" / "spaces" / "tldr-refine.yaml").read_text()
KL = "kl:      {low: 0.33,   high: 3.0}"
LR = "lr:          {low: 1.0e-3, high: 4.0e-3, log: true}"


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new)


#: (id, space file text, needle of the error line)
SPACES: list[tuple[str, str | None, str]] = [
    ("missing-file", None, "does not exist"),
    ("not-yaml", "weights: {kl: [1, 2\n", "is not valid YAML"),
    ("python-tag", edited("description:", "description: !!python/object/apply:os.system ['touch pwned']\nx:"),
     "is not valid YAML"),
    ("not-a-mapping", "- weights\n- params\n", "must hold a mapping"),
    ("unknown-section", BASE + "stepz: 3\n", "unknown section(s) ['stepz']"),
    ("missing-terms", "weights:\n  kl: {low: 0.1, high: 1.0}\n", "no entry for ['kl_pert'"),
    ("low-above-high", edited(KL, "kl: {low: 3.0, high: 0.33}"), "need 0 < low < high"),
    ("bound-not-a-number", edited(KL, "kl: {low: abc, high: 3.0}"), "weights.kl.low must be a number"),
    ("negative-log-bound", edited(LR, "lr: {low: -1.0, high: 4.0e-3, log: true}"), "a log range needs low > 0"),
    ("bad-fixed-value", edited("variant: vector-matrix", "variant: 3"), "fixed.variant: unknown variant 3"),
    ("kkt-space-for-tldr", "attack: kkt\nparams:\n  evil: {low: 0, high: 1}\n", "this is a kkt search space"),
]


def _space(tmp: Path, text: str | None) -> Path:
    path = tmp / "space.yaml"
    if text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name,text,needle", SPACES, ids=[s[0] for s in SPACES])
def test_a_bad_search_space_is_refused_by_the_reaudit(tmp_path, name, text, needle):
    res = run_cli([REPO / "tune" / "reaudit.py", "--space", _space(tmp_path, text), "--dry-run"], cwd=tmp_path)
    check_refused(res, needle)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()  # no store was touched


@pytest.mark.parametrize("name,text,needle", [s for s in SPACES if s[0] in ("python-tag", "low-above-high")],
                         ids=["python-tag", "low-above-high"])
def test_a_bad_search_space_is_refused_by_the_search(tmp_path, name, text, needle):
    res = run_cli([REPO / "tune" / "search.py", "--space", _space(tmp_path, text), "--trials", "1"], cwd=tmp_path)
    check_refused(res, needle)
    assert not (tmp_path / "pwned").exists()


#: A process with no PostgreSQL driver at all (the import system refuses them), then the real registry CLI.
NO_DRIVER = ("import runpy, sys\n"
             "for m in ('psycopg2', 'psycopg', 'pg8000'): sys.modules[m] = None\n"
             "sys.argv = ['registry'] + sys.argv[1:]\n"
             "runpy.run_module('tldr_core.platform.registry.cli', run_name='__main__')\n")

#: (id, tracking URI, run without any PostgreSQL driver, needle)
URIS: list[tuple[str, str, bool, str]] = [
    ("postgresql-without-any-driver", "postgresql://mlflow:s3cret@db.invalid:5432/mlflow", True,
     "no PostgreSQL driver is installed"),
    ("postgres-scheme-without-any-driver", "postgres://mlflow:s3cret@db.invalid/mlflow", True,
     "no PostgreSQL driver is installed"),
    ("http-unreachable", "http://127.0.0.1:1", False, "is unreachable"),
    ("sqlite-under-proc", "sqlite:////proc/tldr-store/mlflow.db", False, "cannot create the folder"),
    # issue 24 #4: a closed database port took MLflow's retries, 106 s; its port is probed first
    ("postgresql-closed-port", "postgresql://mlflow:s3cret@127.0.0.1:1/mlflow", False,
     "is unreachable: nothing answers at 127.0.0.1:1"),
]


@pytest.mark.parametrize("name,uri,no_driver,needle", URIS, ids=[u[0] for u in URIS])
def test_a_bad_tracking_uri_is_one_error_line_without_the_password(tmp_path, name, uri, no_driver, needle):
    args = ["--tracking-uri", uri, "show", "--dataset", "mnist-bundled"]
    cmd = ["-c", NO_DRIVER, *args] if no_driver else ["-m", "tldr_core.platform.registry.cli", *args]
    res = run_cli(cmd, cwd=tmp_path)
    check_refused(res, needle)
    assert "s3cret" not in res.stdout + res.stderr
    assert res.seconds < 40  # no retries against a store that is not there (an import is 3-10 s of it)


# ------------------------------------------------------------------------------ issue 24 #12

class BrokenMlflow(BaseHTTPRequestHandler):
    """/health answers "OK"; the API answers invalid JSON, except (when ``search_ok``) the experiments search."""

    search_ok = False

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok_search = type(self).search_ok and self.path.startswith("/api/2.0/mlflow/experiments/search")
        body = b"OK" if self.path == "/health" else b'{"experiments": []}' if ok_search else b"<html>not json"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if self.path == "/health" else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def broken_server():
    def start(search_ok: bool) -> str:
        handler = type("Handler", (BrokenMlflow,), {"search_ok": search_ok})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()


AUDIT_TINY = ["-m", "tldr_core.cli.audit", "--dataset", "digits-8x8", "--train-size", "100", "--device", "cpu",
              "--steps", "3", "--per-class", "2", "--batch-size", "8", "--classifier-epochs", "1",
              "--membership-refs", "0"]


def test_an_audit_to_a_server_whose_api_is_broken_is_refused_before_any_work(tmp_path, broken_server):
    res = run_cli([*AUDIT_TINY, "--tracking-uri", broken_server(False), "--out", tmp_path / "out"], cwd=tmp_path)
    check_refused(res, "answers /health but not its API")
    assert not (tmp_path / "out").exists()


def test_an_audit_whose_store_fails_after_the_files_are_written_is_one_line(tmp_path, broken_server):
    """The API breaks after the start-up check: the audit's files stay, the failure is one error line."""
    res = run_cli([*AUDIT_TINY, "--no-membership", "--tracking-uri", broken_server(True), "--out", tmp_path / "out"],
                  cwd=tmp_path)
    assert res.code == 2 and len(res.errors) == 1, res.stderr[-3000:]
    assert f"the audit is written in {tmp_path / 'out'}, but logging it to MLflow" in res.errors[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "report.html").is_file()
