"""The gateway's Flight service: thin handlers over the tunnel bridge; auth is middleware."""

from __future__ import annotations

import functools
import logging
import time

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import BearerAuthFactory, PeerCredentials, TicketSigner, caller, dataset_from_descriptor
from ..config import TenantCredentials
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
            result = handler(self, who, *args)
        except Exception as exc:
            self._observe(method, who, start, exc)
            raise _as_client_error(method, exc) from None
        if isinstance(result, flight.GeneratorStream):
            return result  # observed when its stream ends (`_observed_batches`)
        self._observe(method, who, start, None)
        return result
    return guarded


class GatewayFlightServer(flight.FlightServerBase):
    """Every call is served through this gateway's tunnels until `join_cluster` (`--registry`): then endpoints
    name this replica's Flight location and calls for tenants whose tunnel is on another replica go to that
    replica (gateway/cluster.py)."""

    def __init__(self, location: str, bridge: TunnelBridge, tenants: dict[str, TenantCredentials],
                 tickets: TicketSigner, metrics: GatewayMetrics | None = None, peers: PeerCredentials | None = None,
                 gateway_id: str = "", **kwargs) -> None:
        self.auth = BearerAuthFactory(tenants, peers, gateway_id)
        super().__init__(location, middleware={"auth": self.auth}, **kwargs)
        self._bridge = bridge
        self._tickets = tickets
        self._metrics = metrics or bridge.metrics
        self._cluster: ClusterRouter | None = None  # set by join_cluster (`--registry`)
        self._locations: list[flight.Location] = []

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

    def join_cluster(self, cluster: ClusterRouter, advertise: str) -> None:
        """`--registry`: route calls for other replicas' tenants; name `advertise` in every endpoint."""
        self._cluster = cluster
        self._locations = [flight.Location(advertise)]

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

    @served
    def get_flight_info(self, who, descriptor):
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

    def list_actions(self, context):
        return []  # an authenticated call that touches no data: the load client's connect probe

    def do_get(self, context, ticket):
        return self._do_get(context, ticket, context.is_cancelled)

    @served
    def _do_get(self, who, ticket, cancelled):
        start = time.perf_counter()
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
