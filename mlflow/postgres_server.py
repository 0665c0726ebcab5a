"""An MLflow tracking server backed by a private PostgreSQL cluster, both on loopback only.

    python mlflow/postgres_server.py                         # http://127.0.0.1:5000, cluster in a temp dir
    python mlflow/postgres_server.py --port 5001 --data-dir runs/pg --artifacts-destination runs/pg-artifacts

Starts `initdb` + `pg_ctl` on a cluster of its own (a temp folder unless --data-dir; a kept --data-dir
is reused), creates the database `mlflow`, then runs `mlflow server --backend-store-uri
postgresql+psycopg2://tldr@127.0.0.1:<pg-port>/mlflow` until Ctrl-C / SIGTERM, and stops both. PostgreSQL
refuses to run as root: as root, the cluster runs as the `postgres` user (created by Debian's
package). Missing binaries: as root, `apt-get install -y postgresql` is run; otherwise it stops
with the command to run. The driver is psycopg2-binary (pip install psycopg2-binary).
Prints `MLflow tracking server ready: http://127.0.0.1:<port>` once /health answers.

This folder must never get an __init__.py (it would shadow the mlflow package).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_USER = "tldr"
DB = "mlflow"


class SetupError(RuntimeError):  # printed as one line
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir(install: bool = True) -> Path:
    """The folder of initdb/pg_ctl; installs Debian's postgresql as root when missing."""
    def find() -> Path | None:
        for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            if Path(cand, "initdb").exists() and Path(cand, "pg_ctl").exists():
                return Path(cand)
        exe = shutil.which("initdb")
        return Path(exe).resolve().parent if exe and shutil.which("pg_ctl") else None

    found = find()
    if found or not install:
        if not found:
            raise SetupError("PostgreSQL is not installed (no initdb/pg_ctl)")
        return found
    if os.geteuid() != 0:
        raise SetupError("PostgreSQL is not installed (no initdb/pg_ctl); install it: "
                         "sudo apt-get install -y postgresql")
    print("installing PostgreSQL: apt-get install -y postgresql", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True, text=True)
    found = find()
    if r.returncode != 0 or not found:
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[:300]
        raise SetupError(f"apt-get install -y postgresql failed (exit {r.returncode}): {tail}")
    return found


def check_driver() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise SetupError(f"the PostgreSQL driver is missing: {sys.executable} -m pip install psycopg2-binary") from None


class Cluster:
    """A private PostgreSQL cluster on 127.0.0.1:port (trust auth for loopback, user `tldr`)."""

    def __init__(self, bindir: Path, data_dir: Path, port: int) -> None:
        self.bindir, self.data_dir, self.port = bindir, data_dir, port
        self.sock_dir = Path(tempfile.mkdtemp(prefix="tldr-pgsock-"))
        self.as_user = None
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise SetupError("running as root, and there is no `postgres` user to run PostgreSQL as "
                                 "(PostgreSQL refuses root); run as a normal user") from None
            self.as_user = "postgres"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user:
            runner = shutil.which("runuser") or shutil.which("setpriv")
            if runner and runner.endswith("runuser"):
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
            for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._own(self.data_dir)
        self._own(self.sock_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync")
        opts = f"-p {self.port} -k {self.sock_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", opts, "-l", str(self.data_dir / "server.log"),
                  "-w", "-t", "90", "start", timeout=120)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DB}")
        conn.close()
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{DB}"

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


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    tmp = None if args.data_dir else Path(tempfile.mkdtemp(prefix="tldr-pg-"))
    if tmp is not None:
        os.chmod(tmp, 0o755)
    data_dir = Path(args.data_dir).resolve() if args.data_dir else tmp / "data"
    artifacts = Path(args.artifacts_destination or data_dir.parent / "mlartifacts").resolve()
    cluster: Cluster | None = None
    server: subprocess.Popen | None = None
    stopping = False

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        check_driver()
        cluster = Cluster(pg_bindir(), data_dir, args.pg_port or free_port())
        backend = cluster.start()
        print(f"PostgreSQL ready: {backend} (data {data_dir})", flush=True)
        artifacts.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe) if exe.exists() else "mlflow", "server", "--backend-store-uri", backend,
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers),
               "--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        server = subprocess.Popen(cmd, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{args.port}"
        wait_health(url, server, args.startup_timeout)
        print(f"MLflow tracking server ready: {url}", flush=True)
        server.wait()
        if not stopping:
            print(f"error: mlflow server exited with code {server.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stopping = True
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
