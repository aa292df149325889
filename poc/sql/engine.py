"""SQL over a connector's datasets: DuckDB, sandboxed to the datasets, one SELECT at a time.

The engine is chosen in docs/architecture.md ("SQL at the connector"): DuckDB pushes projections and filters
into its scans, streams results batch by batch, can be interrupted from another thread, and can be shut off
from the file system. Each query runs on its own cursor of one in-memory database whose views name the
datasets; the database is configured before any query runs and its configuration is then locked:

- the datasets are Arrow datasets (their Parquet files) registered with each cursor, and the views read them
  by a neutral name: no path is in the catalogue, and DuckDB itself reads no file (`enable_external_access`
  off: no `read_csv('/etc/passwd')`, no `COPY … TO`, no `ATTACH`, no extension, no setting changed back);
- a query is exactly one statement whose type is SELECT, its values bound as parameters (`?` or `$1`…,
  never spliced into its text), checked by DuckDB's own parser before anything
  runs, and its tree (`json_serialize_sql`) holds only what poc.sql.allowed names: relations that are
  datasets, and listed node types, functions and types (no catalogue, settings or file functions); its text
  is at most `max_query_bytes` bytes;
- error texts have the datasets' file paths cut out;
- `memory_limit` bounds what one database may hold, and `threads` what it may use.
"""

from __future__ import annotations

import threading
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..config import MAX_QUERY_BYTES
from ..tunnel.params import to_python
from .allowed import check_duckdb
from .errors import SqlError
from .params import counted, parameter_schema

CATALOG = "connector"  # the one catalog a tenant's client sees (Flight SQL GetCatalogs)
DB_SCHEMA = "main"


def _duckdb():
    import duckdb  # imported on first use: a connector that serves no SQL does not load it

    return duckdb


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Query:
    """One running query: read `reader` batch by batch; `interrupt()` stops it from any thread."""

    reader: pa.RecordBatchReader | None
    _cursor: object
    timed_out: bool = False
    sql: str = ""
    engine: "SqlEngine | None" = None
    params: list | None = None  # the values bound to its placeholders, as DuckDB takes them

    def run(self) -> "Query":
        return self.engine.run(self)

    def read(self) -> pa.RecordBatch | None:
        return self.engine.read(self)

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # a read and the close

    def interrupt(self, timed_out: bool = False) -> None:
        self.timed_out = self.timed_out or timed_out
        try:
            self._cursor.interrupt()
        except Exception:  # already closed
            pass

    def close(self) -> None:
        with self._lock:  # after the read in progress, if any (interrupted first, it ends soon)
            try:
                self._cursor.close()
            except Exception:
                pass


class SqlEngine:
    """DuckDB over `files` (dataset name → Parquet file) and `tables` (dataset name → Arrow table held in
    memory), sandboxed as the module says."""

    def __init__(self, files: dict[str, Path] | None = None, tables: dict[str, pa.Table] | None = None, *,
                 memory_limit_mb: int = 1024, threads: int = 2, max_query_bytes: int = MAX_QUERY_BYTES) -> None:
        duckdb = _duckdb()
        import pyarrow.dataset  # here: the gateway imports this module's names, never runs it (18 MB)

        self.max_query_bytes = max_query_bytes
        files = {name: Path(path).resolve() for name, path in (files or {}).items()}
        # Each dataset is an Arrow object registered with every cursor as `_source_N`; its view names it.
        self._sources = {f"_source_{i}": source for i, source in enumerate(
            [*(pyarrow.dataset.dataset(path) for path in files.values()), *(tables or {}).values()])}
        self._paths = sorted({text for path in files.values() for text in (str(path), str(path.parent))},
                             key=len, reverse=True)  # cut out of error texts, longest first
        self._db = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False, "autoload_known_extensions": False,
            "allow_community_extensions": False, "threads": threads, "memory_limit": f"{memory_limit_mb}MB"})
        self._db.execute(f"ATTACH ':memory:' AS {CATALOG}")  # the catalog clients name (`connector.main.t`)
        self._db.execute(f"USE {CATALOG}")
        self._db.execute("SET enable_external_access = false")
        self._register(self._db)
        for name, source in zip([*files, *(tables or {})], self._sources):
            self._db.execute(f"CREATE VIEW {_quote(name)} AS SELECT * FROM {source}")
        self._db.execute("SET lock_configuration = true")
        self._lock = threading.Lock()  # cursors are made from the one connection one at a time
        self.names = sorted([*files, *(tables or {})])

    def _register(self, cursor) -> None:
        for name, source in self._sources.items():
            cursor.register(name, source)

    def check(self, sql: str) -> None:
        """Refuse what is not one SELECT within the size limit, before it reaches the engine."""
        size = len(sql.encode("utf-8", "surrogatepass"))
        if size > self.max_query_bytes:
            raise SqlError("invalid_request", f"query of {size} bytes, over the limit of {self.max_query_bytes}")
        if not sql.strip():
            raise SqlError("invalid_request", "empty query")
        duckdb = _duckdb()
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise self._error(exc) from None
        if len(statements) != 1:
            raise SqlError("invalid_request", f"one statement per query, got {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise SqlError("invalid_request", f"only SELECT queries are allowed, got "
                                              f"{statements[0].type.name.replace('_', ' ')}")
        cursor = self._cursor()
        try:
            tree = cursor.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
        except duckdb.Error as exc:
            raise self._error(exc) from None
        finally:
            cursor.close()
        check_duckdb(tree, set(self.names))

    def _cursor(self):
        with self._lock:
            cursor = self._db.cursor()
        cursor.execute(f"USE {CATALOG}")  # each cursor starts in DuckDB's own default catalog
        self._register(cursor)
        return cursor

    def placeholders(self, sql: str) -> int:
        """How many values a checked query takes: its placeholders, `?` or `$1`…`$n` (named ones are refused)."""
        names = _duckdb().extract_statements(sql)[0].named_parameters
        if set(names) != {str(i) for i in range(1, len(names) + 1)}:
            raise SqlError("invalid_request", "named parameters ($name) are not supported: use ? or $1, $2, …")
        return len(names)

    def _values(self, sql: str, params: list | None, describing: bool = False) -> list | None:
        """The values to bind (poc.tunnel.params), as many as the query has placeholders; to describe a query
        whose values are not bound yet, nulls."""
        count = self.placeholders(sql)
        if params is None and describing:
            return [None] * count or None
        return to_python(counted(count, params)) or None

    def prepare(self, sql: str, params: list | None = None) -> tuple[pa.Schema, pa.Schema]:
        """The result's schema (with `params`, or before values are bound) and its parameters'
        (poc.sql.params.parameter_schema)."""
        return self.schema(sql, params), parameter_schema(self.placeholders(sql))

    def schema(self, sql: str, params: list | None = None) -> pa.Schema:
        """The result's schema, from binding the query (nothing is read beyond the files' metadata); with its
        values, or before they are known."""
        self.check(sql)
        values = self._values(sql, params, describing=True)
        cursor = self._cursor()
        try:
            return cursor.sql(sql, params=values).limit(0).to_arrow_table().schema
        except _duckdb().Error as exc:
            raise self._error(exc) from None
        finally:
            cursor.close()

    def open(self, sql: str, params: list | None = None) -> Query:
        """A query checked, its values bound, and given its cursor, not started: `run` starts it (in a worker
        thread, since an aggregate computes its whole result before the first batch); `interrupt()` works from
        now on."""
        self.check(sql)
        values = self._values(sql, params)
        return Query(None, self._cursor(), sql=sql, engine=self, params=values)

    def run(self, query: Query, batch_rows: int = 65536) -> Query:
        """Start the query; its batches are then produced as they are read (`Query.reader`)."""
        try:
            with query._lock:
                query.reader = query._cursor.sql(query.sql, params=query.params).to_arrow_reader(batch_rows)
        except _duckdb().Error as exc:
            query.close()
            if query.timed_out:
                raise SqlError("timed_out", "the query ran past its time limit") from None
            raise self._error(exc) from None
        return query

    def start(self, sql: str, batch_rows: int = 65536, params: list | None = None) -> Query:
        """`open` and `run` in one step."""
        return self.run(self.open(sql, params), batch_rows)

    def read(self, query: Query) -> pa.RecordBatch | None:
        """The query's next batch, or None at its end; runs in a worker thread (DuckDB releases the GIL)."""
        try:
            with query._lock:
                return query.reader.read_next_batch()
        except StopIteration:
            return None
        except (_duckdb().Error, pa.ArrowException) as exc:
            if query.timed_out:
                raise SqlError("timed_out", "the query ran past its time limit") from None
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> SqlError:
        """DuckDB's error as the tunnel's code: unknown tables are not found, file access is forbidden,
        everything the client wrote wrong is an invalid request; the engine's own message goes along, with
        the datasets' file paths cut out."""
        duckdb = _duckdb()
        text = str(exc)
        for path in self._paths:
            text = text.replace(path, "<dataset>")
        if isinstance(exc, duckdb.CatalogException):
            return SqlError("not_found", text)
        if isinstance(exc, duckdb.PermissionException):
            return SqlError("forbidden", text)
        if isinstance(exc, duckdb.InterruptException):
            return SqlError("cancelled", text)
        if isinstance(exc, duckdb.OutOfMemoryException):
            return SqlError("resource_exhausted", text)
        if isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.ConversionException,
                            duckdb.InvalidInputException, duckdb.NotImplementedException,
                            duckdb.SyntaxException, duckdb.TypeMismatchException, duckdb.OutOfRangeException)):
            return SqlError("invalid_request", text)
        return SqlError("internal", text)

    def close(self) -> None:
        self._db.close()
