"""Datasets read from the customer's databases through ADBC (`connector --sources FILE`), Arrow end to end.

The sources file names each dataset and where it comes from:

    datasets:
      sales:  {url: "postgresql://reader@127.0.0.1:5432/shop", table: public.sales}
      recent: {url: "postgresql://reader@127.0.0.1:5432/shop", query: "SELECT * FROM sales WHERE day > now() - interval '7 days'"}
      events: {url: "sqlite:///srv/data/events.db", table: events}
      orders: {path: data/orders.parquet}
    password_file: secrets/db-password   # optional; else POC_SOURCE_PASSWORD

A password never comes from the command line: it is the one in the URL, if the file's URL holds one, else read
from `password_file` (relative to the sources file) or the environment variable POC_SOURCE_PASSWORD; it is cut
out of every error message before that is logged or sent.

A database dataset is never held: each DoGet opens a connection, runs `SELECT * FROM <table>` (or the query) in
a read-only transaction with a statement timeout, and reads the cursor batch by batch (`fetch_record_batch`)
only as the stream has credit, so a slow client slows the database read and the connector holds about one
batch. Its schema comes from the database without reading rows. A SQL query over database datasets is run by
the database, after `DatabaseSql` checked it is one SELECT over exposed datasets and rewrote their names to
the tables behind them. The source layer is `Database`: PostgreSQL and SQLite here; another ADBC driver is a
subclass naming its driver and its dialect.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .config import ConfigError
from .sql.allowed import check_pushdown, is_cte_reference
from .sql.engine import MAX_QUERY_BYTES, SqlError
from .tunnel.messages import valid_dataset_name

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


def table_query(table: "DatabaseDataset") -> "DatabaseQuery":
    """A DoGet of a database dataset: the whole table (or query dataset), not bounded in time — a slow client
    may take long to read it; the stream ends when the client leaves or cancels, which cancels the statement."""
    return DatabaseQuery(table.database, f"SELECT * FROM {table.relation}", None)


DRIVERS = {"postgresql": PostgreSQL, "postgres": PostgreSQL, "sqlite": SQLite}


@dataclass
class DatabaseDataset:
    """A dataset that lives in a database: a table, or a query's result."""

    name: str
    database: Database
    table: str | None = None
    query: str | None = None
    _schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def relation(self) -> str:
        """What a SELECT reads from: the table, or the query as a subquery."""
        return self.database.quote(self.table) if self.table else f"({self.query}) AS {self.database.quote(self.name)}"

    def schema(self, timeout_s: float) -> pa.Schema:
        """From the database without reading rows (on first use; blocking)."""
        if self._schema is None:
            self._schema = describe(self.database, f"SELECT * FROM {self.relation}", timeout_s)
        return self._schema


class DatabaseQuery:
    """One statement running in a database: the same shape as the DuckDB engine's Query (run, read,
    interrupt, close), so the connector streams either the same way."""

    def __init__(self, database: Database, sql: str, timeout_s: float | None) -> None:
        self.database = database
        self.sql = sql
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
                self._cursor.execute(self.sql)
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


def describe(database: Database, sql: str, timeout_s: float) -> pa.Schema:
    """The schema of a statement's result, without running it (ADBC's execute_schema), or, where the driver
    cannot, from the statement's first batch of a LIMIT 0."""
    conn = None
    try:
        conn = database.connect()
        with conn.cursor() as cursor:
            database.prepare(cursor, timeout_s)
            try:
                return _plain(cursor.adbc_execute_schema(sql))
            except Exception as exc:
                if "NOT_IMPLEMENTED" not in str(exc) and "not implemented" not in str(exc).lower():
                    raise
            cursor.execute(f"SELECT * FROM ({sql}) AS q LIMIT 0")
            return _plain(cursor.fetch_record_batch().schema)
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


def load_sources(path: str | Path) -> tuple[dict[str, DatabaseDataset], dict[str, Path]]:
    """Read a sources file: (database datasets, Parquet datasets' files). Raises ConfigError with the reason."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read sources file {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict) or not doc["datasets"]:
        raise ConfigError(f"{path}: expected 'datasets:' mapping names to {{url, table|query}} or {{path}}")
    password = _password(path, doc.get("password_file"))
    databases: dict[str, Database] = {}
    tables: dict[str, DatabaseDataset] = {}
    files: dict[str, Path] = {}
    for name, spec in doc["datasets"].items():
        where = f"{path}: dataset {name!r}"
        if not valid_dataset_name(name):
            raise ConfigError(f"{where}: not a dataset name (1-128 of A-Z a-z 0-9 _ - .; docs/protocol.md §3a)")
        if not isinstance(spec, dict) or set(spec) - {"url", "table", "query", "path"}:
            raise ConfigError(f"{where}: give url with table or query, or path")
        if "path" in spec:
            if set(spec) != {"path"}:
                raise ConfigError(f"{where}: a path dataset has nothing but its path")
            files[name] = (path.parent / str(spec["path"])).resolve()
            continue
        url, table, query = spec.get("url"), spec.get("table"), spec.get("query")
        if not isinstance(url, str) or (table is None) == (query is None):
            raise ConfigError(f"{where}: give url and exactly one of table and query")
        scheme = url.split(":", 1)[0]
        if scheme not in DRIVERS:
            raise ConfigError(f"{where}: url scheme {scheme!r} is not one of {sorted(DRIVERS)}")
        if query is not None and (not isinstance(query, str) or len(query.encode()) > MAX_QUERY_BYTES):
            raise ConfigError(f"{where}: query must be text of at most {MAX_QUERY_BYTES} bytes")
        if table is not None and not isinstance(table, str):
            raise ConfigError(f"{where}: table must be text (schema.table)")
        database = databases.get(url)
        if database is None:
            parts = urllib.parse.urlsplit(url)
            if parts.password is not None:  # kept in the file; taken out of the URL so no message can show it
                bare = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1))
                database = databases[url] = DRIVERS[scheme](urllib.parse.urlunsplit(bare),
                                                            urllib.parse.unquote(parts.password))
            else:
                database = databases[url] = DRIVERS[scheme](url, password)
        tables[name] = DatabaseDataset(name, database, table=table, query=query)
    return tables, files


def _password(path: Path, password_file) -> str | None:
    if password_file is not None:
        try:
            return (path.parent / str(password_file)).read_text().strip("\n")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read password_file: {exc.strerror}") from None
    return os.environ.get(PASSWORD_ENV)


def involves(sql: str, tables: dict[str, DatabaseDataset]) -> bool:
    """Whether a query names any database dataset (it then runs in that database, not in DuckDB)."""
    import sqlglot
    from sqlglot import exp

    try:
        trees = sqlglot.parse(sql)
    except sqlglot.errors.ParseError:
        return False  # DuckDB's parser gives the client its own message
    return any(t.name in tables for tree in trees if tree is not None for t in tree.find_all(exp.Table))


def pushdown(sql: str, tables: dict[str, DatabaseDataset], files: set[str]) -> tuple[Database, str]:
    """A client's query for the database its datasets live in: one SELECT over exposed datasets of one
    database only, holding nothing but what poc.sql.allowed lists (node types, functions, types), and
    rewritten so that each dataset's name reads its own definition as a subquery — `(SELECT * FROM <table>)`
    or `(<query>)` — the only SQL that touches real tables (so no system column or catalogue is in reach
    either). Raises SqlError with the reason."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    try:
        named = {t.name for tree in sqlglot.parse(sql) if tree is not None for t in tree.find_all(exp.Table)}
    except (sqlglot.errors.SqlglotError, RecursionError) as exc:
        raise SqlError("invalid_request", f"syntax error: {str(exc)[:500]}") from None
    databases = {id(tables[n].database): tables[n].database for n in named if n in tables}
    if not databases:
        raise SqlError("not_found", f"the query names none of the connector's datasets ({', '.join(sorted(tables))})")
    if len(databases) != 1:
        raise SqlError("invalid_request", "a query may read the datasets of one database only")
    if named & files:
        raise SqlError("invalid_request", "a query may not join database datasets with Parquet datasets: "
                                          f"{sorted(named & files)} are files")
    database = next(iter(databases.values()))
    try:
        trees = sqlglot.parse(sql, read=database.DIALECT)
    except (sqlglot.errors.SqlglotError, RecursionError) as exc:
        raise SqlError("invalid_request", f"syntax error: {str(exc)[:500]}") from None
    if len(trees) != 1 or trees[0] is None:
        raise SqlError("invalid_request", f"one statement per query, got {len(trees)}")
    tree = trees[0]
    if not isinstance(tree, exp.Query) or tree.find(exp.Into) or tree.find(exp.Lock):
        raise SqlError("invalid_request", "only SELECT queries are allowed (no INTO, no FOR UPDATE)")
    mine = {name for name, table in tables.items() if table.database is database}
    try:
        tree = normalize_identifiers(tree, dialect=database.DIALECT)  # names as the database compares them
        check_pushdown(tree, mine, database.DIALECT)
    except RecursionError:
        raise SqlError("invalid_request", "the query is nested too deeply") from None
    definitions: dict[str, exp.Expression] = {}  # each dataset's definition, parsed once
    for table in list(tree.find_all(exp.Table)):
        if is_cte_reference(table):
            continue
        dataset, alias = tables[table.name], table.alias or table.name
        if dataset.name not in definitions:
            definitions[dataset.name] = (exp.select("*").from_(exp.to_table(dataset.table, dialect=database.DIALECT))
                                         if dataset.table else sqlglot.parse_one(dataset.query, read=database.DIALECT))
        table.replace(exp.Subquery(this=definitions[dataset.name].copy(),
                                   alias=exp.TableAlias(this=exp.to_identifier(alias))))
    return database, tree.sql(dialect=database.DIALECT)
