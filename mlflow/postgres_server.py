"""An MLflow tracking server backed by a private PostgreSQL cluster, both on loopback only.

    python mlflow/postgres_server.py                         # http://127.0.0.1:5000, cluster in a temp dir
    python mlflow/postgres_server.py --port 5001 --data-dir runs/pg --artifacts-destination runs/pg-artifacts

Starts `initdb` + `pg_ctl` on a cluster of its own (a temp folder unless --data-dir; a kept --data-dir
is reused), then runs `mlflow server` on the database `mlflow` until Ctrl-C / SIGTERM, and stops both.

Security (nothing on this machine gets in without a password):
- every connection, TCP and socket, needs a password (scram-sha-256); there is no `trust` line;
- both passwords are generated (the bootstrap superuser `tldr_admin`, the owner `tldr`) and kept in
  `<data-dir>/tldr-credentials.json`, mode 0600, beside the cluster (itself 0700);
- MLflow connects as `tldr`, which owns the database `mlflow` but is not a superuser and cannot
  create roles or databases, so it cannot run programs (`COPY ... TO PROGRAM`) or read server files;
- PostgreSQL listens on 127.0.0.1 only and puts its Unix socket in a private (0700) folder;
- the MLflow server gets its database URI (with the password) from its environment, not its
  command line, so the process list does not show it.
PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user. The script never
installs system packages: missing binaries stop it with the command to run (exit 2). The driver is
psycopg2-binary. Prints `MLflow tracking server ready: http://127.0.0.1:<port>` once /health answers.

This folder must never get an __init__.py (it would shadow the mlflow package).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADMIN = "tldr_admin"   # bootstrap superuser: creates the owner role and the database, nothing else
OWNER = "tldr"         # what MLflow connects as
DB = "mlflow"
CREDENTIALS = "tldr-credentials.json"
INSTALL_HINT = ("install it with the system's package manager, e.g. `sudo apt-get install -y postgresql` "
                "(Debian/Ubuntu) or `brew install postgresql` (macOS), then run this again")


class SetupError(RuntimeError):  # printed as one line
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    """The folder of initdb/pg_ctl. Never installs anything: a missing PostgreSQL is a SetupError."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists() and Path(cand, "pg_ctl").exists():
            return Path(cand)
    exe = shutil.which("initdb")
    if exe and shutil.which("pg_ctl"):
        return Path(exe).resolve().parent
    raise SetupError(f"PostgreSQL is not installed (no initdb/pg_ctl found); {INSTALL_HINT}")


def check_driver() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise SetupError(f"the PostgreSQL driver is missing: {sys.executable} -m pip install psycopg2-binary") from None


def new_credentials() -> dict[str, str]:
    return {"admin_user": ADMIN, "admin_password": secrets.token_hex(24),
            "owner_user": OWNER, "owner_password": secrets.token_hex(24), "database": DB}


def write_credentials(path: Path, creds: dict[str, str]) -> None:
    """Created with mode 0600 (never world-readable, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)


def read_credentials(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise SetupError(f"{path} is missing: this cluster was not made by this script (or the file was "
                         "deleted); pick another --data-dir")
    if path.stat().st_mode & 0o077:
        raise SetupError(f"{path} is readable by other users; chmod 600 it (it holds the database passwords)")
    return json.loads(path.read_text())


class Cluster:
    """A private PostgreSQL cluster on 127.0.0.1:port: password (scram-sha-256) auth for every
    connection, a non-superuser owner of the MLflow database, a 0700 socket folder."""

    def __init__(self, bindir: Path, data_dir: Path, port: int) -> None:
        self.bindir, self.data_dir, self.port = bindir, data_dir, port
        self.sock_dir = Path(tempfile.mkdtemp(prefix="tldr-pgsock-"))  # mkdtemp: mode 0700
        self.as_user = None
        self.creds: dict[str, str] = {}
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise SetupError("running as root, and there is no `postgres` user to run PostgreSQL as "
                                 "(PostgreSQL refuses root); run as a normal user") from None
            self.as_user = "postgres"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / CREDENTIALS

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user:
            runner = shutil.which("runuser")
            if runner:
                return [runner, "-u", self.as_user, "--", *cmd]
            return ["su", self.as_user, "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]
        return cmd

    def _run(self, *args: str, timeout: float = 120) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd="/")
        if r.returncode != 0:
            tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-3:])[:400]
            raise SetupError(f"{args[0]} failed (exit {r.returncode}): {tail}")

    def _own(self, path: Path) -> None:
        if self.as_user:
            import pwd

            pw = pwd.getpwnam(self.as_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _initdb(self) -> None:
        """A new cluster whose only superuser has the generated admin password; no trust lines."""
        pwfile = self.sock_dir / "initdb-pw"  # in the private socket folder, removed right after
        pwfile.write_text(self.creds["admin_password"] + "\n")
        os.chmod(pwfile, 0o600)
        self._own(pwfile)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", ADMIN, f"--pwfile={pwfile}",
                      "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
                      "--no-locale", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> str:
        """Start (and on first use create) the cluster; returns the owner's URI with the password masked."""
        fresh = not (self.data_dir / "PG_VERSION").exists()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._own(self.data_dir)
        os.chmod(self.sock_dir, 0o700)
        self._own(self.sock_dir)
        if fresh and any(self.data_dir.iterdir()):
            raise SetupError(f"{self.data_dir} is not empty and holds no PostgreSQL cluster; pick another --data-dir")
        if fresh:
            self.creds = new_credentials()
            self._initdb()
            write_credentials(self.credentials_file, self.creds)
        else:
            self.creds = read_credentials(self.credentials_file)
        opts = (f"-p {self.port} -k {self.sock_dir} -c listen_addresses=127.0.0.1 -c unix_socket_permissions=0700 "
                "-c password_encryption=scram-sha-256 -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", opts, "-l", str(self.data_dir / "server.log"),
                  "-w", "-t", "90", "start", timeout=120)
        self._ensure_owner_and_database()
        return f"postgresql+psycopg2://{OWNER}:***@127.0.0.1:{self.port}/{DB}"

    def _ensure_owner_and_database(self) -> None:
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=ADMIN, password=self.creds["admin_password"],
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                                "PASSWORD %s").format(sql.Identifier(OWNER)), (self.creds["owner_password"],))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB), sql.Identifier(OWNER)))
            # the owner needs its own database only
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE postgres FROM PUBLIC"))
        conn.close()

    def owner_uri(self) -> str:
        return f"postgresql+psycopg2://{OWNER}:{self.creds['owner_password']}@127.0.0.1:{self.port}/{DB}"

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", timeout=60)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not stop PostgreSQL: {exc}", file=sys.stderr)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def wait_health(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SetupError(f"mlflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SetupError(f"mlflow server did not answer {url}/health within {timeout:.0f}s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python mlflow/postgres_server.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=5000, help="MLflow server port on 127.0.0.1 (default 5000)")
    p.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    p.add_argument("--data-dir", default=None,
                   help="cluster folder, kept and reused (default: a temp folder, deleted on exit); as root, "
                        "the postgres user must be able to reach it")
    p.add_argument("--artifacts-destination", default=None,
                   help="where the server stores artifacts (default: <data-dir>/../mlartifacts, or a temp folder)")
    p.add_argument("--workers", type=int, default=1, help="MLflow server workers (default 1)")
    p.add_argument("--startup-timeout", type=float, default=180, help="seconds to wait for /health (default 180)")
    return p


def start_mlflow(cluster: Cluster, args: argparse.Namespace, artifacts: Path) -> subprocess.Popen:
    """`mlflow server` on the cluster; the URI with the password travels in its environment only."""
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
           "--workers", str(args.workers), "--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": cluster.owner_uri(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tmp = None if args.data_dir else Path(tempfile.mkdtemp(prefix="tldr-pg-"))
    if tmp is not None:
        os.chmod(tmp, 0o755)  # the postgres user (when run as root) must reach data/ inside it
    data_dir = Path(args.data_dir).resolve() if args.data_dir else tmp / "data"
    artifacts = Path(args.artifacts_destination or data_dir.parent / "mlartifacts").resolve()
    cluster: Cluster | None = None
    server: subprocess.Popen | None = None

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        check_driver()
        cluster = Cluster(pg_bindir(), data_dir, args.pg_port or free_port())
        shown = cluster.start()
        print(f"PostgreSQL ready: {shown} (data {data_dir}; passwords in {cluster.credentials_file})", flush=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        server = start_mlflow(cluster, args, artifacts)
        url = f"http://127.0.0.1:{args.port}"
        wait_health(url, server, args.startup_timeout)
        print(f"MLflow tracking server ready: {url}", flush=True)
        server.wait()
        print(f"error: mlflow server exited with code {server.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if cluster is not None:
            cluster.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
