"""A private PostgreSQL cluster for the tests and the benchmark: `initdb` and `pg_ctl` of
the distribution's server (Debian's `postgresql` package), on a unix socket in a temporary
folder, no TCP, no shared server. `initdb` and the server refuse to run as root, so as root
they run as the package's `postgres` user (`runuser`) on a folder that user owns."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def postgres_bin() -> Path | None:
    """The folder of the newest installed server's programs, or None."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


class PostgresCluster:
    """One cluster; `url(name)` is a SQLAlchemy URL for one of its databases."""

    # fsync off: the tests crash the server (`restart -m immediate`), never the machine,
    # and a crash of the server alone loses nothing a commit returned for.
    SETTINGS = ("fsync=off", "full_page_writes=off", "max_connections=400")

    def __init__(self, bin_dir: Path, base: Path | None = None) -> None:
        self.bin = bin_dir
        self.base = base or Path(tempfile.mkdtemp(prefix="mailrouter-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base
        self.port = 5432 + (os.getpid() % 2000)  # names the socket file only: no TCP
        self._as: list[str] = []
        if os.geteuid() == 0:
            # The server refuses to run as root: the package's own user runs it.
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._databases = 0

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as, *command], capture_output=True, text=True, check=check, timeout=120
        )

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = " ".join(
            [f"-k {self.socket_dir}", f"-p {self.port}", "-c listen_addresses=''"]
            + [f"-c {setting}" for setting in self.SETTINGS]
        )
        log = self.base / "server.log"
        result = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-o", options,
            "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}{text[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)  # fmt: skip

    def restart_immediate(self) -> None:
        """A crash: no checkpoint, every connection cut; recovery replays the WAL."""
        self.stop("immediate")
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=database,
            autocommit=True,
        ) as connection:  # fmt: skip
            connection.execute(statement.encode())

    def new_database(self, template: str | None = None) -> str:
        """A new empty database (a copy of `template`, if given); returns its URL."""
        self._databases += 1
        name = f"t{self._databases}_{uuid.uuid4().hex[:8]}"
        self.sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)


def start_postgres() -> PostgresCluster:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs postgresql (as root)")
    cluster = PostgresCluster(bin_dir)
    cluster.init()
    cluster.start()
    return cluster


def wait_for_postgres(cluster: PostgresCluster, timeout: float = 30.0) -> None:
    """Until the server accepts connections again (after a restart)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.sql("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
