"""The baseline: the same datasets and delay served straight over Flight, no tunnel.

Every dataset is a Source (poc.sources): a held Parquet table is sent from memory after the simulated delay; a
database's is read from its cursor per DoGet, as a connector would, within --db-connections. Flight SQL is the
same surface as the gateway's, over an engine in this process (`LocalSql`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from .auth import BearerAuthFactory, TenantCalls, TicketSigner, caller_tenant, dataset_from_descriptor
from .config import DB_CONNECTIONS, MAX_CALLS_PER_TENANT, TenantCredentials, extraction_delay_s
from .flight_actions import Actions
from .flight_errors import flight_error
from .sources import Described, Source
from .sql.errors import SqlError
from .sql.service import (FlightSqlService, add_sql_actions, bind_parameters, descriptor_command, serve_result,
                          sql_command)


def local_error(exc: SqlError) -> Exception:
    """An engine's or database's SqlError as a server in this process reports it to a Flight client."""
    return flight_error(exc.code, str(exc)[:1024], "the server")


class DirectFlightServer(flight.FlightServerBase):
    """Plain Flight over the same datasets; every tenant sees the same data."""

    def __init__(self, location: str, sources: dict[str, Source], tenants: dict[str, TenantCredentials] | None,
                 delay_ms: tuple[float, float] = (0.0, 0.0), timeout_s: float = 60.0,
                 db_connections: int = DB_CONNECTIONS, **kwargs) -> None:
        # the same auth as the gateway's, and the same share of calls in progress per tenant
        self.auth = BearerAuthFactory(tenants, calls=TenantCalls(MAX_CALLS_PER_TENANT)) if tenants else None
        super().__init__(location, middleware={"auth": self.auth} if tenants else {}, **kwargs)
        self._sources = sources
        self._db_slots: dict[int, threading.BoundedSemaphore] = {}  # database → connections at once, as a connector
        self._db_connections = db_connections
        self._timeout_s = timeout_s
        self._tables = {name: s.dataset.table() for name, s in sources.items() if s.held}
        self._delay_ms = delay_ms
        self._tickets = TicketSigner()
        self._authenticated = bool(tenants)
        self._sql: FlightSqlService | None = None  # made at the first Flight SQL call (`sql`)
        self.actions = Actions()  # the Flight actions this server answers (poc.flight_actions)
        add_sql_actions(self.actions, lambda: self.sql)

    @property
    def sql(self) -> FlightSqlService:
        """The same Flight SQL surface as the gateway's, over an engine in this process."""
        if self._sql is None:
            from .sql.engine import SqlEngine

            held = {n: s for n, s in self._sources.items() if s.held}
            engine = SqlEngine({n: s.path for n, s in held.items() if s.path is not None},
                               {n: self._tables[n] for n, s in held.items() if s.path is None})
            schemas = {n: self._described(n).schema for n in self._sources}
            self._sql = FlightSqlService(LocalSql(engine, schemas, self._sources, self._timeout_s))
        return self._sql

    def _tenant(self, context) -> str:
        return caller_tenant(context) if self._authenticated else ""

    def _source(self, name: str) -> Source:
        try:
            return self._sources[name]
        except KeyError:
            raise pa.ArrowKeyError(f"dataset {name!r} not found") from None

    def _described(self, name: str) -> Described:
        try:
            return self._source(name).describe(self._timeout_s)
        except SqlError as exc:
            raise local_error(exc) from None

    def _flight_info(self, tenant: str, name: str, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        described = self._described(name)
        endpoint = flight.FlightEndpoint(self._tickets.issue(tenant, name), [])
        return flight.FlightInfo(described.schema, descriptor, [endpoint], described.rows, described.bytes)

    def _read(self, name: str, cancelled) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """A dataset's schema and batches: a held one's after the simulated delay, a database's from its
        cursor (waiting, while the client waits, for one of the database's connections)."""
        source = self._source(name)
        if source.held:
            time.sleep(extraction_delay_s(self._delay_ms))
            return source.dataset.schema, iter(self._tables[name].to_batches())
        slots = self._db_slots.setdefault(id(source.database), threading.BoundedSemaphore(self._db_connections))
        while not slots.acquire(timeout=0.5):
            if cancelled():
                raise flight.FlightCancelledError("the client left while waiting for a database connection")
        try:
            reader = source.reader().run()
        except SqlError as exc:
            slots.release()
            raise local_error(exc) from None
        return reader.schema, _released(stream_query(reader), slots)

    def get_flight_info(self, context, descriptor):
        command = descriptor_command(descriptor)
        if command is not None:
            return self.sql.flight_info(self._tenant(context), descriptor, command)
        name = dataset_from_descriptor(descriptor)
        return self._flight_info(self._tenant(context), name, descriptor)

    def list_flights(self, context, criteria):
        tenant = self._tenant(context)
        for name in self._sources:
            yield self._flight_info(tenant, name, flight.FlightDescriptor.for_path("dataset", name))

    def arrow_http(self, cors_origins: tuple[str, ...] = (), vendor_dir=None):
        """The same HTTP Arrow endpoints as the gateway's (poc.http_arrow), over this server's own data."""
        from .http_arrow import ArrowHttp

        tokens = self.auth
        return ArrowHttp(tokens.tenant_for if tokens else (lambda token: ""), lambda who: list(self._sources),
                         lambda who, name: self._read(name, lambda: False),
                         lambda who, sql: self.sql.backend.execute(who, sql, lambda: False),
                         cors_origins, vendor_dir, tokens.calls if tokens else None,
                         lambda who, name: self._flight_info(who.tenant_id, name, flight.FlightDescriptor.for_path(
                             "dataset", name)).total_bytes)

    def get_schema(self, context, descriptor):
        command = descriptor_command(descriptor)
        if command is None:
            return flight.SchemaResult(self.get_flight_info(context, descriptor).schema)
        return flight.SchemaResult(self.sql.schema(self._tenant(context), command))

    def list_actions(self, context):
        return self.actions.types()  # also the load client's connect probe

    def do_action(self, context, action):
        return self.actions.run(self._tenant(context), action)

    def do_put(self, context, descriptor, reader, writer):
        self._tenant(context)
        writer.write(pa.py_buffer(bind_parameters(descriptor_command(descriptor), reader)))

    def do_get(self, context, ticket):
        message = sql_command(ticket.ticket)
        if message is not None:
            result = self.sql.do_get(self._tenant(context), message, context.is_cancelled)
            return serve_result(result, flight.GeneratorStream)
        name = self._tickets.redeem(ticket.ticket, self._tenant(context))
        if self._source(name).held:
            time.sleep(extraction_delay_s(self._delay_ms))
            return flight.RecordBatchStream(self._tables[name])
        schema, batches = self._read(name, context.is_cancelled)
        return flight.GeneratorStream(schema, batches)


class LocalSql:
    """A `SqlBackend` (poc.sql.service) over an engine in this process: the same SQL surface as the gateway's,
    no tunnel. Queries naming database datasets run in their database (poc.sources.pushdown), as at a
    connector."""

    def __init__(self, engine, schemas: dict[str, pa.Schema], sources: dict[str, Source],
                 timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.schemas = schemas
        self.sources = sources
        self.has_databases = any(s.database is not None for s in sources.values())
        self.timeout_s = timeout_s

    def tables(self, who, with_schemas: bool) -> list[tuple[str, pa.Schema | None]]:
        return [(name, schema if with_schemas else None) for name, schema in self.schemas.items()]

    def _pushed(self, sql: str):
        if not self.has_databases:
            return None  # nothing lives in a database: DuckDB's queries never load sqlglot
        from .sources.pushdown import route

        return route(sql, self.sources)

    def prepare(self, who, sql: str) -> tuple[pa.Schema, pa.Schema]:
        from .sources.database import describe

        try:
            pushed = self._pushed(sql)
            return describe(*pushed, self.timeout_s) if pushed else self.engine.prepare(sql)
        except SqlError as exc:
            raise local_error(exc) from None

    def describe(self, who, sql: str, params: list | None = None) -> pa.Schema:
        from .sources.database import describe

        try:
            pushed = self._pushed(sql)
            return describe(*pushed, self.timeout_s, params)[0] if pushed else self.engine.schema(sql, params)
        except SqlError as exc:
            raise local_error(exc) from None

    def execute(self, who, sql: str, cancelled, params: list | None = None):
        from .sources.pushdown import pushed_query

        try:
            pushed = self._pushed(sql)
            query = pushed_query(pushed, self.timeout_s, params) if pushed else self.engine.open(sql, params)
            query.run()
        except SqlError as exc:
            raise local_error(exc) from None
        return query.schema, stream_query(query)


def stream_query(query) -> Iterator[pa.RecordBatch]:
    """A started query's batches (DuckDB's or a database's); however the stream ends, the query is stopped."""
    try:
        while (batch := query.read()) is not None:
            yield batch
    except SqlError as exc:
        raise local_error(exc) from None
    finally:
        query.interrupt()
        query.close()


def _released(batches, slots: threading.BoundedSemaphore):
    try:
        yield from batches
    finally:
        slots.release()
