"""Datasets that live in the customer's databases, read through ADBC: Arrow end to end (a Source, poc.sources.base).

A database dataset is never held: each read opens a connection, runs `SELECT * FROM <table>` (or the query) in
a read-only transaction with a statement timeout, and reads the cursor batch by batch (`fetch_record_batch`)
only as the stream has credit, so a slow client slows the database read and the connector holds about one
batch. Its schema comes from the database without reading rows. A password never comes from the command line:
it is the one in the URL, if the sources file's URL holds one, else read from `password_file` or the environment
variable POC_SOURCE_PASSWORD; it is cut out of every error message before that is logged or sent. The source
layer is `Database`: PostgreSQL and SQLite here; another ADBC driver is a subclass naming its driver and its
dialect, and one entry in DRIVERS.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..config import MAX_QUERY_BYTES, ConfigError
from ..sql.errors import SqlError
from ..sql.params import counted, parameter_schema, to_arrow
from .base import Described

PASSWORD_ENV = "POC_SOURCE_PASSWORD"
BATCH_HINT_BYTES = 2 * 1024 * 1024  # what the PostgreSQL driver should put in one batch


def _plain(schema: pa.Schema) -> pa.Schema:
    """The schema without the driver's per-field metadata (clients see types, not the database's names)."""
    return pa.schema([f.remove_metadata() for f in schema])


class Database:
    """One database reached through an ADBC driver; subclasses name the driver and the SQL dialect."""

    DIALECT = ""

    def __init__(self, url: str, password: str | None) -> None:
        self.url = url
        self._password = password

    def redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def connect(self):
        raise NotImplementedError

    def prepare(self, cursor, timeout_s: float | None) -> None:
        """Make the transaction read-only and bounded in time (None: not bounded), before the statement runs."""

    def quote(self, table: str) -> str:
        return ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))


class PostgreSQL(Database):
    DIALECT = "postgres"

    def connect(self):
        import adbc_driver_postgresql.dbapi as driver

        url = self.url
        if self._password is not None:
            parts = urllib.parse.urlsplit(url)
            user = urllib.parse.quote(parts.username or "", safe="")
            netloc = f"{user}:{urllib.parse.quote(self._password, safe='')}@{parts.hostname}" + (
                f":{parts.port}" if parts.port else "")
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        return driver.connect(url, autocommit=False)

    def prepare(self, cursor, timeout_s: float | None) -> None:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(f"SET LOCAL statement_timeout = {int((timeout_s or 0) * 1000)}")  # 0: none
        cursor.adbc_statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(BATCH_HINT_BYTES)})


class SQLite(Database):
    DIALECT = "sqlite"

    def connect(self):
        import adbc_driver_sqlite.dbapi as driver

        path = self.url[len("sqlite://"):] if self.url.startswith("sqlite://") else self.url[len("sqlite:"):]
        return driver.connect(f"file:{path}?mode=ro", autocommit=True)  # the file is opened read-only


DRIVERS = {"postgresql": PostgreSQL, "postgres": PostgreSQL, "sqlite": SQLite}


@dataclass
class DatabaseSource:
    """A dataset that lives in a database: a table, or a query's result (a Source, poc.sources.base). Nothing is
    held: its schema comes from the database's catalogue, and each read is a statement streamed from a cursor."""

    name: str
    database: Database
    table: str | None = None
    query: str | None = None
    held = False
    fingerprint = None  # a database's rows may change between two reads: never replayed
    _schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def relation(self) -> str:
        """What a SELECT reads from: the table, or the query as a subquery."""
        return self.database.quote(self.table) if self.table else f"({self.query}) AS {self.database.quote(self.name)}"

    def schema(self, timeout_s: float) -> pa.Schema:
        """From the database without reading rows (on first use; blocking)."""
        if self._schema is None:
            self._schema = describe(self.database, f"SELECT * FROM {self.relation}", 0, timeout_s)[0]
        return self._schema

    def describe(self, timeout_s: float) -> Described:
        """The schema from the catalogue; rows and bytes unknown (-1), as Flight allows."""
        return Described(self.schema(timeout_s), -1, -1)

    def reader(self) -> "DatabaseQuery":
        """The whole table (or query dataset), not bounded in time — a slow client may take long to read it; the
        stream ends when the client leaves or cancels, which cancels the statement."""
        return DatabaseQuery(self.database, f"SELECT * FROM {self.relation}", None)


def bound_values(placeholders: int, params: list | None) -> pa.RecordBatch | None:
    """A pushed query's values (poc.tunnel.params) as the one-row batch its driver binds, as many as the query
    has placeholders; SqlError otherwise."""
    values = counted(placeholders, params)
    return to_arrow(values) if values else None


class DatabaseQuery:
    """One statement running in a database, its values bound by the driver (never spliced into its text): the
    same shape as the DuckDB engine's Query (run, read, interrupt, close), so the connector streams either the
    same way."""

    def __init__(self, database: Database, sql: str, timeout_s: float | None,
                 values: pa.RecordBatch | None = None) -> None:
        self.database = database
        self.sql = sql
        self.values = values
        self.timeout_s = timeout_s
        self.timed_out = False
        self.reader: pa.RecordBatchReader | None = None
        self._conn = self._cursor = None
        self._schema: pa.Schema | None = None
        self._lock = threading.Lock()  # a read and the close

    def run(self) -> "DatabaseQuery":
        try:
            with self._lock:
                self._conn = self.database.connect()
                self._cursor = self._conn.cursor()
                self.database.prepare(self._cursor, self.timeout_s)
                self._cursor.execute(self.sql, self.values)
                self.reader = self._cursor.fetch_record_batch()
                self._schema = _plain(self.reader.schema)
        except Exception as exc:
            self.close()
            raise source_error(self.database, exc, self.timed_out) from None
        return self

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def read(self) -> pa.RecordBatch | None:
        try:
            with self._lock:
                batch = self.reader.read_next_batch()
        except StopIteration:
            return None
        except Exception as exc:
            raise source_error(self.database, exc, self.timed_out) from None
        return pa.RecordBatch.from_arrays(batch.columns, schema=self._schema)

    def interrupt(self, timed_out: bool = False) -> None:
        """Cancel the statement at the database (ADBC's cancel may be called from any thread)."""
        self.timed_out = self.timed_out or timed_out
        cursor = self._cursor
        if cursor is not None:
            try:
                cursor.adbc_cancel()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            for thing in (self._cursor, self._conn):
                if thing is not None:
                    try:
                        if thing is self._conn:
                            thing.rollback()
                        thing.close()
                    except Exception:
                        pass
            self._cursor = self._conn = None


def describe(database: Database, sql: str, placeholders: int, timeout_s: float,
             params: list | None = None) -> tuple[pa.Schema, pa.Schema]:
    """The schema of a statement's result, without running it (ADBC's execute_schema), or, where the driver
    cannot, from the statement's first batch of a LIMIT 0 (with its values bound: nulls until they are known);
    and its parameters' schema."""
    values = bound_values(placeholders, params) if params is not None else None
    conn = None
    try:
        conn = database.connect()
        with conn.cursor() as cursor:
            database.prepare(cursor, timeout_s)
            try:
                return _plain(cursor.adbc_execute_schema(sql)), parameter_schema(placeholders)
            except Exception as exc:
                if "NOT_IMPLEMENTED" not in str(exc) and "not implemented" not in str(exc).lower():
                    raise
            if values is None and placeholders:
                values = pa.RecordBatch.from_arrays([pa.nulls(1)] * placeholders,
                                                    names=[f"p{i}" for i in range(placeholders)])
            cursor.execute(f"SELECT * FROM ({sql}) AS q LIMIT 0", values)
            return _plain(cursor.fetch_record_batch().schema), parameter_schema(placeholders)
    except Exception as exc:
        raise source_error(database, exc) from None
    finally:
        if conn is not None:
            try:
                conn.rollback()
                conn.close()
            except Exception:
                pass


def source_error(database: Database, exc: Exception, timed_out: bool = False) -> SqlError:
    """A driver's error as the tunnel's code, its password cut out: a statement past its timeout is timed_out,
    one the database refused (syntax, unknown table, permission) invalid_request or not_found, anything about
    reaching it (down, wrong password, connection lost) unavailable."""
    text = database.redact(str(exc)).split("\n")[0][:900]
    lower = text.lower()
    if timed_out or "statement timeout" in lower or "canceling statement due to statement timeout" in lower:
        return SqlError("timed_out", f"the database statement ran past its time limit: {text}")
    if "does not exist" in lower or "no such table" in lower:
        return SqlError("not_found", text)
    if any(word in lower for word in ("syntax error", "permission denied", "read-only transaction", "invalid",
                                      "cannot", "no such column")):
        return SqlError("invalid_request", text)
    return SqlError("unavailable", f"the connector cannot read its database: {text}")


def from_spec(name: str, spec: dict, where: str, shared: dict) -> DatabaseSource:
    """A sources file's `{url, table}` or `{url, query}` entry. `shared` is one per file: the databases made so
    far (one per URL) and the file's password."""
    url, table, query = spec.get("url"), spec.get("table"), spec.get("query")
    if set(spec) - {"url", "table", "query"} or not isinstance(url, str) or (table is None) == (query is None):
        raise ConfigError(f"{where}: give url and exactly one of table and query")
    scheme = url.split(":", 1)[0]
    if scheme not in DRIVERS:
        raise ConfigError(f"{where}: url scheme {scheme!r} is not one of {sorted(DRIVERS)}")
    if query is not None and (not isinstance(query, str) or len(query.encode()) > MAX_QUERY_BYTES):
        raise ConfigError(f"{where}: query must be text of at most {MAX_QUERY_BYTES} bytes")
    if table is not None and not isinstance(table, str):
        raise ConfigError(f"{where}: table must be text (schema.table)")
    databases = shared.setdefault("databases", {})
    database = databases.get(url)
    if database is None:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:  # kept in the file; taken out of the URL so no message can show it
            bare = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1))
            database = databases[url] = DRIVERS[scheme](urllib.parse.urlunsplit(bare),
                                                        urllib.parse.unquote(parts.password))
        else:
            database = databases[url] = DRIVERS[scheme](url, password(shared["file"], shared["password_file"]))
    return DatabaseSource(name, database, table=table, query=query)


def password(path: Path, password_file) -> str | None:
    """The databases' password: from `password_file` (relative to the sources file), else POC_SOURCE_PASSWORD."""
    if password_file is not None:
        try:
            return (path.parent / str(password_file)).read_text().strip("\n")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read password_file: {exc.strerror}") from None
    return os.environ.get(PASSWORD_ENV)
