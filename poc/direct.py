"""The baseline: the same datasets and delay served straight over Flight, no tunnel."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.flight as flight

from .auth import BearerAuthFactory, TenantCalls, TicketSigner, caller_tenant, dataset_from_descriptor
from .catalog import Dataset
from .config import DB_CONNECTIONS, MAX_CALLS_PER_TENANT, TenantCredentials, extraction_delay_s
from .sql.service import FlightSqlService, LocalSql, descriptor_command, serve_result, sql_command


def _released(batches, slots: threading.BoundedSemaphore):
    try:
        yield from batches
    finally:
        slots.release()


class DirectFlightServer(flight.FlightServerBase):
    """Plain Flight over the same in-memory datasets; every tenant sees the same data."""

    def __init__(self, location: str, datasets: dict[str, Dataset], tenants: dict[str, TenantCredentials] | None,
                 delay_ms: tuple[float, float] = (0.0, 0.0), sources: dict | None = None,
                 timeout_s: float = 60.0, db_connections: int = DB_CONNECTIONS, **kwargs) -> None:
        # the same auth as the gateway's, and the same share of calls in progress per tenant
        self.auth = BearerAuthFactory(tenants, calls=TenantCalls(MAX_CALLS_PER_TENANT)) if tenants else None
        super().__init__(location, middleware={"auth": self.auth} if tenants else {}, **kwargs)
        self._datasets = datasets
        self._sources = sources or {}  # name → DatabaseDataset (--sources): read from its database per DoGet
        self._db_slots: dict[int, threading.BoundedSemaphore] = {}  # database → connections at once, as a connector
        self._db_connections = db_connections
        self._timeout_s = timeout_s
        self._tables = {name: ds.table() for name, ds in datasets.items()}
        self._delay_ms = delay_ms
        self._tickets = TicketSigner()
        self._authenticated = bool(tenants)
        self._sql: FlightSqlService | None = None  # made at the first Flight SQL call (`sql`)

    @property
    def sql(self) -> FlightSqlService:
        """The same Flight SQL surface as the gateway's, over an engine in this process."""
        if self._sql is None:
            from .sql.engine import SqlEngine

            engine = SqlEngine({n: ds.path for n, ds in self._datasets.items() if ds.path is not None},
                               {n: self._tables[n] for n, ds in self._datasets.items() if ds.path is None})
            schemas = {n: ds.schema for n, ds in self._datasets.items()}
            schemas.update({n: self._table_schema(t) for n, t in self._sources.items()})
            self._sql = FlightSqlService(LocalSql(engine, schemas, self._sources, self._timeout_s))
        return self._sql

    def _tenant(self, context) -> str:
        return caller_tenant(context) if self._authenticated else ""

    def _dataset(self, name: str) -> Dataset:
        try:
            return self._datasets[name]
        except KeyError:
            raise pa.ArrowKeyError(f"dataset {name!r} not found") from None

    def _flight_info(self, tenant: str, ds: Dataset, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(self._tickets.issue(tenant, ds.name), [])
        return flight.FlightInfo(ds.schema, descriptor, [endpoint], ds.rows, ds.ipc_bytes)

    def _table_schema(self, table) -> pa.Schema:
        from .sql.engine import SqlError
        from .sql.service import local_error

        try:
            return table.schema(self._timeout_s)
        except SqlError as exc:
            raise local_error(exc) from None

    def get_flight_info(self, context, descriptor):
        command = descriptor_command(descriptor)
        if command is not None:
            return self.sql.flight_info(self._tenant(context), descriptor, command)
        name = dataset_from_descriptor(descriptor)
        if name in self._sources:  # from the database's catalogue: rows and bytes unknown
            endpoint = flight.FlightEndpoint(self._tickets.issue(self._tenant(context), name), [])
            return flight.FlightInfo(self._table_schema(self._sources[name]), descriptor, [endpoint], -1, -1)
        ds = self._dataset(name)
        return self._flight_info(self._tenant(context), ds, descriptor)

    def list_flights(self, context, criteria):
        tenant = self._tenant(context)
        for ds in self._datasets.values():
            yield self._flight_info(tenant, ds, flight.FlightDescriptor.for_path("dataset", ds.name))

    def arrow_http(self, cors_origins: tuple[str, ...] = (), vendor_dir=None):
        """The same HTTP Arrow endpoints as the gateway's (poc.http_arrow), over this server's own data."""
        from .http_arrow import ArrowHttp

        tokens = self.auth

        def dataset(who, name):
            ds = self._dataset(name)
            time.sleep(extraction_delay_s(self._delay_ms))
            return ds.schema, iter(self._tables[ds.name].to_batches())

        return ArrowHttp(tokens.tenant_for if tokens else (lambda token: ""), lambda who: list(self._datasets),
                         dataset, lambda who, sql: self.sql.backend.execute(who, sql, lambda: False),
                         cors_origins, vendor_dir, tokens.calls if tokens else None)

    def get_schema(self, context, descriptor):
        command = descriptor_command(descriptor)
        if command is None:
            return flight.SchemaResult(self.get_flight_info(context, descriptor).schema)
        return flight.SchemaResult(self.sql.schema(self._tenant(context), command))

    def list_actions(self, context):
        return FlightSqlService.action_types()  # also the load client's connect probe

    def do_action(self, context, action):
        return self.sql.do_action(self._tenant(context), action)

    def do_put(self, context, descriptor, reader, writer):
        raise FlightSqlService.refuse_put(descriptor_command(descriptor))

    def do_get(self, context, ticket):
        message = sql_command(ticket.ticket)
        if message is not None:
            result = self.sql.do_get(self._tenant(context), message, context.is_cancelled)
            return serve_result(result, flight.GeneratorStream)
        name = self._tickets.redeem(ticket.ticket, self._tenant(context))
        if name in self._sources:
            from .sources import table_query
            from .sql.engine import SqlError
            from .sql.service import local_error, stream_query

            table = self._sources[name]
            slots = self._db_slots.setdefault(id(table.database), threading.BoundedSemaphore(self._db_connections))
            while not slots.acquire(timeout=0.5):  # wait for a connection while the client waits
                if context.is_cancelled():
                    raise flight.FlightCancelledError("the client left while waiting for a database connection")
            try:
                query = table_query(table).run()
            except SqlError as exc:
                slots.release()
                raise local_error(exc) from None
            return flight.GeneratorStream(query.schema, _released(stream_query(query), slots))
        table = self._tables[self._dataset(name).name]
        time.sleep(extraction_delay_s(self._delay_ms))
        return flight.RecordBatchStream(table)
