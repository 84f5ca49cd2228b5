"""A throwaway PostgreSQL cluster for tests: initdb into a fresh folder, one server on a free
loopback port, roles and databases made like ``docker/postgres-init``, stopped and removed at
the end.

Run as root, every PostgreSQL program runs as the ``postgres`` user (initdb refuses root);
otherwise as the current user. The binaries are found on PATH or under
``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package puts them there).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .conftest import free_port


def find_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``, or None where PostgreSQL is not installed."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    newest_first = sorted(versions, key=lambda p: p.parent.name.zfill(8), reverse=True)
    candidates += newest_first
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "psql")):
            return folder
    return None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if find_bin() is None:
        return (
            "PostgreSQL binaries (initdb, pg_ctl, psql) not found on PATH or under "
            "/usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user to run PostgreSQL as"
    return None


class Cluster:
    """One PostgreSQL server on 127.0.0.1:``port`` with databases owned by roles of their own
    (``databases``: name -> password; the role has the database's name)."""

    def __init__(self, databases: dict[str, str]):
        self.bin = find_bin()
        self.databases = databases
        self.root = Path(tempfile.mkdtemp(prefix="leukemia-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = 0
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o700)

    def _run(self, *command, check=True, timeout=120, **kwargs) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self._user else []
        return subprocess.run(
            [*prefix, *map(str, command)],
            cwd=self.root,
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def start(self, attempts: int = 3) -> Cluster:
        self._run(
            self.bin / "initdb", "-D", self.data, "--username", "postgres", "--encoding", "UTF8",
            "--auth-local", "trust", "--auth-host", "scram-sha-256", "--no-sync",
        )  # fmt: skip
        self._run("mkdir", "-p", self.sockets)
        for _ in range(attempts):  # another process may take the free port first
            self.port = free_port()
            options = (
                f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            started = self._run(
                self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                "-o", options, "start", check=False,
            )  # fmt: skip
            if started.returncode == 0:
                break
        else:
            raise RuntimeError(f"PostgreSQL did not start: {self.log_tail()}")
        for name, password in self.databases.items():
            self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
            self.psql(f"CREATE DATABASE {name} OWNER {name}")
            self.psql(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")
        return self

    def psql(self, sql: str) -> str:
        """Run ``sql`` as the superuser over the cluster's Unix socket."""
        done = self._run(
            self.bin / "psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-At",
            "-h", self.sockets, "-p", self.port, "-U", "postgres", "-d", "postgres", "-c", sql,
        )  # fmt: skip
        return done.stdout.strip()

    def url(self, database: str, password: bool = False) -> str:
        """A SQLAlchemy URL of ``database`` as its own role; the password only when asked (a
        process can get it from PGPASSWORD instead, as the compose services do)."""
        secret = f":{self.databases[database]}" if password else ""
        return f"postgresql+psycopg2://{database}{secret}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``) and remove the cluster's folder."""
        try:
            if (self.data / "postmaster.pid").is_file():
                stopped = self._run(
                    self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop",
                    check=False, timeout=60,
                )  # fmt: skip
                if stopped.returncode != 0:
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """pg_ctl could not stop it: the postmaster this cluster started, by its recorded pid."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cluster(databases: dict[str, str]):
    """A started ``Cluster``, stopped and removed when the block ends, however it ends."""
    instance = Cluster(databases)
    try:
        yield instance.start()
    finally:
        instance.stop()
