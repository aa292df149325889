"""The gateway's Flight service: thin handlers over the tunnel bridge; auth is middleware."""

from __future__ import annotations

import functools
import logging
import time

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import (BearerAuthFactory, PeerCredentials, TenantCalls, TicketSigner, caller, dataset_from_descriptor,
                    request_bytes)
from ..config import TenantCredentials
from ..http_arrow import ArrowHttp
from ..sql.proto import TicketStatementQuery, pack_any
from ..sql.service import (FlightSqlService, checked_query, descriptor_command, make_handle, serve_result,
                           sql_command)
from .bridge import NotHere, TunnelBridge
from .cluster import ClusterRouter
from .metrics import GatewayMetrics

log = logging.getLogger("poc.gateway")

OUTCOMES = ((flight.FlightUnauthenticatedError, "unauthenticated"), (flight.FlightUnauthorizedError, "unauthorized"),
            (flight.FlightUnavailableError, "unavailable"), (flight.FlightTimedOutError, "timed_out"),
            (flight.FlightCancelledError, "cancelled"), (flight.FlightServerError, "connector_error"),
            (pa.ArrowKeyError, "not_found"), (pa.ArrowInvalid, "invalid"), (GeneratorExit, "cancelled"))


def outcome_of(error: BaseException | None) -> str:
    """The `outcome` label of a Flight call: ok, or its error's kind (a fixed set)."""
    if error is None:
        return "ok"
    return next((name for kind, name in OUTCOMES if isinstance(error, kind)), "internal")


def _as_client_error(handler_name: str, exc: Exception) -> Exception:
    """Flight and Arrow errors pass; anything else is a gateway bug, logged here with its traceback and shown
    to the client as an internal error without one (docs/security.md)."""
    if isinstance(exc, (flight.FlightError, pa.ArrowException)):
        return exc
    log.error("%s failed", handler_name, exc_info=exc)
    return flight.FlightInternalError("internal error in the gateway")


def served(handler):
    """Clients see messages only; every call is counted and timed by method and outcome, a DoGet until its
    stream ends (poc_gateway_flight_requests_total, poc_gateway_flight_request_seconds)."""
    method = handler.__name__

    @functools.wraps(handler)
    def guarded(self, context, *args):
        start = time.perf_counter()
        who = caller(context)
        try:
            if who.peer_request is not None:  # forwarded: its credentials name this one request
                who.check_request(request_bytes(method, args))
            result = handler(self, who, *args)
        except Exception as exc:
            self._observe(method, who, start, exc)
            raise _as_client_error(method, exc) from None
        if isinstance(result, flight.GeneratorStream):
            return result  # observed when its stream ends (`_observed_batches`)
        self._observe(method, who, start, None)
        return result
    return guarded


QUERY_LABEL = "(sql)"  # the dataset label of a query's stream in metrics and usage


class TunnelSql:
    """Flight SQL through the tenant's tunnel: the tables are the datasets its connector registered (their
    schemas asked of it), and queries run at the connector (protocol 1.5 `query_info`, `query`)."""

    def __init__(self, bridge: TunnelBridge) -> None:
        self._bridge = bridge

    def tables(self, who, with_schemas: bool) -> list[tuple[str, pa.Schema | None]]:
        names, _ = self._bridge.datasets(who.tenant_id, who.peer_epoch)
        if not with_schemas:
            return [(name, None) for name in names]
        return [(name, self._bridge.flight_info(who.tenant_id, name, who.request_id, who.peer_epoch)[0])
                for name in names]

    def describe(self, who, sql: str) -> pa.Schema:
        return self._bridge.flight_info(who.tenant_id, QUERY_LABEL, who.request_id, who.peer_epoch, sql=sql)[0]

    def execute(self, who, sql: str, cancelled):
        stream = self._bridge.open_stream(who.tenant_id, QUERY_LABEL, cancelled, who.request_id, who.peer_epoch,
                                          sql=sql)
        return stream.schema, stream.batches()


class GatewayFlightServer(flight.FlightServerBase):
    """Every call is served through this gateway's tunnels until `join_cluster` (`--registry`): then endpoints
    name this replica's Flight location and calls for tenants whose tunnel is on another replica go to that
    replica (gateway/cluster.py)."""

    def __init__(self, location: str, bridge: TunnelBridge, tenants: dict[str, TenantCredentials],
                 tickets: TicketSigner, metrics: GatewayMetrics | None = None, peers: PeerCredentials | None = None,
                 gateway_id: str = "", calls: TenantCalls | None = None, **kwargs) -> None:
        self.auth = BearerAuthFactory(tenants, peers, gateway_id, calls)
        super().__init__(location, middleware={"auth": self.auth}, **kwargs)
        self._bridge = bridge
        self._tickets = tickets
        self._metrics = metrics or bridge.metrics
        self._cluster: ClusterRouter | None = None  # set by join_cluster (`--registry`)
        self._locations: list[flight.Location] = []
        self.sql = FlightSqlService(TunnelSql(bridge))

    @staticmethod
    def _routed(route, here):
        """`route()` to another replica; if none can serve, `here()`: this replica's link that is on its way
        out (draining, or moving to another replica) still serves while it is open."""
        try:
            return route()
        except flight.FlightUnavailableError:
            try:
                result = here()
            except (NotHere, flight.FlightUnavailableError):
                result = None
            if result is None:
                raise
            return result

    def arrow_http(self, cors_origins: tuple[str, ...] = (), vendor_dir=None) -> ArrowHttp:
        """The browsers' endpoints (poc.http_arrow) over this gateway's tunnels: a dataset's stream or a query's
        result, with the same bridge, credit and checks as a Flight DoGet. With replicas, a tenant whose tunnel
        is on another replica is served from there over Flight, as a forwarded DoGet is."""
        def datasets(who):
            return self._here_or_routed(lambda: self._bridge.datasets(who.tenant_id)[0], lambda: [
                info.descriptor.path[1].decode() for info in self._cluster.list_flights(who)])

        def dataset(who, name):
            def here():
                stream = self._bridge.open_stream(who.tenant_id, name, lambda: False, who.request_id)
                return stream.schema, stream.batches()

            def route():
                info = self._cluster.flight_info(who, flight.FlightDescriptor.for_path("dataset", name))
                return self._cluster.do_get(who, info.endpoints[0].ticket, None)
            return self._here_or_routed(here, route)

        def query(who, sql):
            sql = checked_query(sql)
            ticket = flight.Ticket(pack_any(TicketStatementQuery(make_handle(sql))))
            return self._here_or_routed(lambda: self.sql.backend.execute(who, sql, lambda: False),
                                        lambda: self._cluster.do_get(who, ticket, None))

        return ArrowHttp(self.auth.tenant_for, datasets, dataset, query, tuple(cors_origins), vendor_dir, self.auth.calls)

    def join_cluster(self, cluster: ClusterRouter, advertise: str) -> None:
        """`--registry`: route calls for other replicas' tenants; name `advertise` in every endpoint."""
        self._cluster = cluster
        self._locations = [flight.Location(advertise)]
        self.sql.locations = self._locations

    def _observe(self, method: str, who, start: float, error: BaseException | None) -> None:
        """Count, time and log one call: one log line per call, with its request id."""
        outcome, seconds = outcome_of(error), time.perf_counter() - start
        self._metrics.flight_requests.labels(method, outcome).inc()
        self._metrics.flight_seconds.labels(method).observe(seconds)
        log.info("%s %s in %.1f ms%s", method, outcome, seconds * 1000,
                 f": {str(error).splitlines()[0][:200]}" if error is not None and str(error) else "",
                 extra={"tenant": who.tenant_id, "request_id": who.request_id})

    def _observed_batches(self, batches, who, start: float):
        error = None
        try:
            yield from batches
        except BaseException as exc:
            error = exc
            if isinstance(exc, Exception):
                raise _as_client_error("do_get", exc) from None
            raise
        finally:
            self._observe("do_get", who, start, error)

    def _info(self, who, name: str, descriptor: flight.FlightDescriptor, leaving_ok: bool = False) -> flight.FlightInfo:
        schema, rows, size, epoch = self._bridge.flight_info(who.tenant_id, name, who.request_id, who.peer_epoch,
                                                             leaving_ok)
        endpoint = flight.FlightEndpoint(self._tickets.issue(who.tenant_id, name, epoch), self._locations)
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, size)

    def _here_or_routed(self, here, route):
        """`here()`, or, when the tenant's tunnel is on another replica, `route()` there (`--registry`)."""
        try:
            return here()
        except NotHere:
            return self._routed(route, lambda: None)

    @served
    def get_flight_info(self, who, descriptor):
        command = descriptor_command(descriptor)
        if command is not None:  # Flight SQL (poc.sql.service)
            return self._here_or_routed(lambda: self.sql.flight_info(who, descriptor, command),
                                        lambda: self._cluster.flight_info(who, descriptor))
        name = dataset_from_descriptor(descriptor)
        try:
            return self._info(who, name, descriptor)
        except NotHere:
            return self._routed(lambda: self._cluster.flight_info(who, descriptor),
                                lambda: self._info(who, name, descriptor, leaving_ok=True))

    @served
    def list_flights(self, who, criteria):
        try:
            names, _ = self._bridge.datasets(who.tenant_id, who.peer_epoch)
        except NotHere:
            return self._routed(lambda: self._cluster.list_flights(who), lambda: [
                self._info(who, name, flight.FlightDescriptor.for_path("dataset", name), leaving_ok=True)
                for name in self._bridge.datasets(who.tenant_id, leaving_ok=True)[0]])
        return [self._info(who, name, flight.FlightDescriptor.for_path("dataset", name)) for name in names]

    @served
    def get_schema(self, who, descriptor):
        command = descriptor_command(descriptor)
        if command is None:
            return flight.SchemaResult(self.get_flight_info.__wrapped__(self, who, descriptor).schema)
        return flight.SchemaResult(self._here_or_routed(lambda: self.sql.schema(who, command),
                                                        lambda: self._cluster.flight_info(who, descriptor).schema))

    def list_actions(self, context):
        return self.sql.action_types()  # also the load client's connect probe: authenticated, touches no data

    @served
    def do_action(self, who, action):
        return self._here_or_routed(lambda: self.sql.do_action(who, action),
                                    lambda: self._cluster.do_action(who, action))

    @served
    def do_put(self, who, descriptor, reader, writer):
        command = descriptor_command(descriptor)
        raise self.sql.refuse_put(command)

    def do_get(self, context, ticket):
        return self._do_get(context, ticket, context.is_cancelled)

    @served
    def _do_get(self, who, ticket, cancelled):
        start = time.perf_counter()
        message = sql_command(ticket.ticket)
        if message is not None:  # a Flight SQL ticket: a statement's result, or a metadata command's table
            def streamed(schema, batches):
                return flight.GeneratorStream(schema, self._observed_batches(batches, who, start))
            result = self._here_or_routed(lambda: self.sql.do_get(who, message, cancelled),
                                          lambda: self._cluster.do_get(who, ticket, None))
            return serve_result(result, streamed)
        dataset, epoch = self._tickets.claims(ticket.ticket, who.tenant_id)
        try:
            stream = self._bridge.open_stream(who.tenant_id, dataset, cancelled, who.request_id, who.peer_epoch)
        except NotHere:
            def here():
                local = self._bridge.open_stream(who.tenant_id, dataset, cancelled, who.request_id, leaving_ok=True)
                return local.schema, local.batches()
            schema, batches = self._routed(lambda: self._cluster.do_get(who, ticket, epoch), here)
            return flight.GeneratorStream(schema, self._observed_batches(batches, who, start))
        return flight.GeneratorStream(stream.schema, self._observed_batches(stream.batches(), who, start))
