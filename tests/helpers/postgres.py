"""A real PostgreSQL for the audit tests: Debian's server, ``initdb`` in a temporary directory owned by the
unprivileged ``postgres`` user, listening on a free loopback port (and a socket in that directory only).

``tests/conftest.py`` starts one per test session (fixture ``postgres``) and stops it at the end; each test
takes a database of its own (:meth:`PostgresServer.database`). :meth:`PostgresServer.restart` stops and starts
the same cluster (the outage tests).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from model_store.serve import free_port

__all__ = ["PostgresServer", "find_postgres"]

ENSURE = Path(__file__).resolve().parents[1] / "ensure_postgres.sh"


def find_postgres() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with ``initdb`` (installing Debian's server when missing and
    root), or None."""
    subprocess.run([str(ENSURE)], check=False, timeout=600)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, run as ``postgres`` (root runs ``runuser``)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cam-audit-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres"
        account = pwd.getpwnam(self.user)
        os.chmod(self.root, 0o755)
        os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", self.user,
                  "--no-sync", "-E", "UTF8")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=60"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect clients and shut down cleanly; ``immediate``: as after a crash."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def database(self, prefix: str = "audit") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
