"""A real PostgreSQL for the audit tests: Debian's server, ``initdb`` in a temporary directory owned by the
unprivileged ``postgres`` user, listening on a free loopback port (and a socket in that directory only).

``tests/conftest.py`` starts one per test session (fixture ``postgres``) and stops it at the end; each test
takes a database of its own (:meth:`PostgresServer.database`). :meth:`PostgresServer.restart` stops and starts
the same cluster (the outage tests).

The server dies with the process that started it, however that one ends: ``postgres`` runs as a child (not
daemonised by ``pg_ctl``) under ``setpriv --pdeathsig SIGQUIT`` (SIGQUIT: PostgreSQL's immediate shutdown, which
takes its backends down too), so a test run killed with SIGKILL or a timeout leaves no server behind; a normal
exit stops it through :meth:`PostgresServer.cleanup` (the fixture's teardown, and ``atexit``).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from model_store.serve import free_port

__all__ = ["PostgresServer", "find_postgres", "dies_with_parent"]

ENSURE = [str(Path(__file__).resolve().parents[1] / "ensure_debian.sh"), "postgresql", 'compgen -G "/usr/lib/postgresql/*/bin/initdb"']


def find_postgres() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with ``initdb`` (installing Debian's server when missing and
    root), or None."""
    subprocess.run(ENSURE, check=False, timeout=600)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def dies_with_parent(command: list[str], signal_name: str = "SIGTERM", user: str | None = None) -> list[str]:
    """``command`` run by ``setpriv`` (util-linux) so that the kernel sends it ``signal_name`` when the thread
    that started it dies (``PR_SET_PDEATHSIG``, kept across ``exec``), as ``user`` when given (set before the
    death signal, which a change of user would clear). Start it from the main thread: the signal follows the
    thread that forked, not the process."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is missing: it ties test servers to the test process")
    account = ["--reuid", user, "--regid", user, "--clear-groups"] if user else []
    return [setpriv, "--pdeathsig", signal_name, *account, "--", *command]


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, run as ``postgres`` (as root: ``initdb`` through
    ``runuser``, the server through ``setpriv``)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cam-audit-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres"
        account = pwd.getpwnam(self.user)
        os.chmod(self.root, 0o755)
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self.process: subprocess.Popen | None = None
        atexit.register(self.cleanup)

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", self.user,
                  "--no-sync", "-E", "UTF8")  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        """``postgres`` on the loopback port, a child of this process that dies with it; returns once it accepts
        connections (``pg_isready``)."""
        command = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                   "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on", "-c", "max_connections=60"]  # fmt: skip
        user = self.user if os.geteuid() == 0 else None
        with open(self.root / "log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(dies_with_parent(command, "SIGQUIT", user), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        ready = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]
        while subprocess.run(ready, check=False, timeout=30).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = (self.root / "log").read_text(errors="replace")[-2000:]
                self.stop("immediate")
                raise RuntimeError(f"PostgreSQL did not start on port {self.port}:\n{log_tail}")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect clients and shut down cleanly; ``immediate``: as after a crash."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

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
        """Stop the server (immediately) and delete its directory; safe to call more than once."""
        try:
            self.stop("immediate")
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
