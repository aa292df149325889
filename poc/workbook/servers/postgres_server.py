"""A real PostgreSQL server for tests and notebooks: Debian's `postgres`, a cluster made with `initdb` in a
folder of its own, a free loopback port, run as the unprivileged `postgres` user when started by root (the
server refuses root), stopped by PID.

The superuser is reached over the cluster's Unix socket only (trust, inside the folder); TCP logins need a
password (scram-sha-256). `add_reader` makes the read-only role the connector uses, as docs/operations.md
recommends: LOGIN, SELECT on the tables it is given, read-only transactions by default.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def postgres_bin() -> Path:
    """The newest installed server's bin folder (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    binary = shutil.which("postgres")
    if binary is None:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)")
    return Path(binary).parent


class PostgresServer:
    """`with PostgresServer(folder) as pg: pg.admin_url` — a fresh cluster on a free port, stopped on exit
    (also when the block fails). `stop()` then `start()` keeps the cluster and the port: the database going
    away and coming back."""

    def __init__(self, folder: str | Path, port: int = 0, log_statements: bool = False) -> None:
        self.log_statements = log_statements  # every statement in postgres.log: what reached the database
        self.port = port or _free_port()
        self.process: subprocess.Popen | None = None
        self._user = "postgres" if os.geteuid() == 0 else None
        self.folder = Path(folder).resolve()
        self._own_folder = False
        if self._user and not _reachable_by_others(self.folder.parent):
            # The postgres user cannot reach a folder below root's private ones (pytest's, mkdtemp's): the
            # cluster gets a folder of its own in /tmp instead, removed by `close()`.
            self.folder = Path(tempfile.mkdtemp(prefix="poc-postgres-"))
            self._own_folder = True

    @property
    def log(self) -> str:
        return (self.folder / "postgres.log").read_text(errors="replace")

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.folder}&port={self.port}"

    def url(self, user: str, database: str = "postgres") -> str:
        """A TCP URL without a password (the connector reads it from POC_SOURCE_PASSWORD or a file)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=True, capture_output=True, text=True, user=self._user, group=self._user,
                              **kwargs)

    def start(self, timeout: float = 30.0) -> "PostgresServer":
        bindir = postgres_bin()
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        if not self.data.exists():
            self._run([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"])
        log = open(self.folder / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", *(("-c", "log_statement=all") if self.log_statements else ())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=self._user, group=self._user)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: "
                                   f"{(self.folder / 'postgres.log').read_text()[-800:]}")
            try:
                self.execute("SELECT 1")
                return self
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not answer on port {self.port} within {timeout:g} s")

    def execute(self, *statements: str) -> None:
        """Run statements as the superuser, committed."""
        import adbc_driver_postgresql.dbapi as driver

        with driver.connect(self.admin_url, autocommit=True) as conn, conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)

    def query(self, sql: str) -> pa.Table:
        import adbc_driver_postgresql.dbapi as driver

        with driver.connect(self.admin_url, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetch_arrow_table()

    def load(self, table: str, data: pa.Table) -> None:
        """Create `table` (public) from an Arrow table, replacing it."""
        import adbc_driver_postgresql.dbapi as driver

        with driver.connect(self.admin_url, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute(f'DROP TABLE IF EXISTS "{table}"')
            cursor.adbc_ingest(table, data, mode="create")

    def add_reader(self, name: str, password: str, tables: list[str]) -> None:
        """A login role that can only read `tables`, in read-only transactions by default."""
        quoted = ", ".join(f'"{t}"' for t in tables)
        secret = password.replace("'", "''")
        self.execute(f'DROP ROLE IF EXISTS "{name}"', f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{secret}'",
                     f'ALTER ROLE "{name}" SET default_transaction_read_only = on',
                     f'GRANT SELECT ON {quoted} TO "{name}"')

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def close(self) -> None:
        """Stop, and remove the cluster's folder if this object made it."""
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def _reachable_by_others(folder: Path) -> bool:
    """Whether every folder from / down to `folder` lets other users through (o+x)."""
    folder = folder.resolve()
    return all(os.stat(p).st_mode & 0o001 for p in [folder, *folder.parents] if p.exists())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_source(folder: Path, parquet: Path, table: str):
    """A PostgreSQL serving `parquet` as `table` to a read-only role, for an experiment's `source: postgresql`:
    yields (server, the sources file connectors and the direct server read, their environment)."""
    import pyarrow.parquet as pq

    password = secrets.token_urlsafe(18)
    with PostgresServer(folder / "postgres") as pg:
        pg.load(table, pq.read_table(parquet))
        pg.add_reader("reader", password, [table])
        sources = folder / "sources.yaml"
        sources.write_text(f"datasets:\n  {table}: {{url: '{pg.url('reader')}', table: {table}}}\n")
        yield pg, sources, {"POC_SOURCE_PASSWORD": password}
