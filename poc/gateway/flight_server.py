"""The gateway's Flight service: thin handlers over one router (poc.gateway.routing); auth is middleware."""

from __future__ import annotations

import functools
import logging
import time

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import BearerAuthFactory, PeerCredentials, TenantCalls, caller, request_bytes
from ..config import TenantCredentials
from ..errors import CallError
from ..flight_errors import for_flight
from ..http_arrow import ArrowHttp
from ..sql.service import bind_parameters, descriptor_command, serve_result
from .metrics import GatewayMetrics
from .routing import Router

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
    """The one place the gateway's errors become Flight's: the project's errors (poc.errors) as their Flight
    kind; Flight and Arrow errors (a forwarded call's, the middleware's, Flight SQL's) pass; anything else is a
    gateway bug, logged here with its traceback and shown to the client as an internal error without one
    (docs/security.md)."""
    if isinstance(exc, CallError):
        return for_flight(exc)
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
            error = _as_client_error(method, exc)
            self._observe(method, who, start, error)
            raise error from None
        if isinstance(result, flight.GeneratorStream):
            return result  # observed when its stream ends (`_observed_batches`)
        self._observe(method, who, start, None)
        return result
    return guarded


class GatewayFlightServer(flight.FlightServerBase):
    """Each handler hands its call to `router`: a LocalRouter alone, a ClusterRouter with replicas
    (`--registry`), which the gateway sets once it knows this replica's location."""

    def __init__(self, location: str, router: Router, tenants: dict[str, TenantCredentials],
                 metrics: GatewayMetrics, peers: PeerCredentials | None = None, gateway_id: str = "",
                 calls: TenantCalls | None = None, **kwargs) -> None:
        self.auth = BearerAuthFactory(tenants, peers, gateway_id, calls)
        super().__init__(location, middleware={"auth": self.auth}, **kwargs)
        self.router = router
        self._metrics = metrics

    def arrow_http(self, cors_origins: tuple[str, ...] = (), vendor_dir=None) -> ArrowHttp:
        """The browsers' endpoints (poc.http_arrow) through the same router: a dataset's stream or a query's
        result, with the same bridge, credit and checks as a Flight DoGet, forwarded like one with replicas."""
        return ArrowHttp(self.auth.tenant_for, lambda who: self.router.dataset_names(who),
                         lambda who, name: self.router.read_dataset(who, name),
                         lambda who, sql: self.router.run_query(who, sql), tuple(cors_origins), vendor_dir,
                         self.auth.calls, lambda who, name: self.router.flight_info(
                             who, flight.FlightDescriptor.for_path("dataset", name)).total_bytes)

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
                error = _as_client_error("do_get", exc)
                raise error from None
            raise
        finally:
            self._observe("do_get", who, start, error)

    @served
    def get_flight_info(self, who, descriptor):
        return self.router.flight_info(who, descriptor)

    @served
    def list_flights(self, who, criteria):
        return self.router.list_flights(who)

    @served
    def get_schema(self, who, descriptor):
        return flight.SchemaResult(self.router.schema(who, descriptor))

    def list_actions(self, context):
        return self.router.action_types()  # also the load client's connect probe: authenticated, touches no data

    @served
    def do_action(self, who, action):
        return self.router.do_action(who, action)

    @served
    def do_put(self, who, descriptor, reader, writer):
        """Binding a prepared query's parameters (nothing else: the service is read-only); no tunnel is asked,
        so any replica answers it."""
        writer.write(pa.py_buffer(bind_parameters(descriptor_command(descriptor), reader)))

    def do_get(self, context, ticket):
        return self._do_get(context, ticket, context.is_cancelled)

    @served
    def _do_get(self, who, ticket, cancelled):
        start = time.perf_counter()

        def streamed(schema, batches):
            return flight.GeneratorStream(schema, self._observed_batches(batches, who, start))
        return serve_result(self.router.do_get(who, ticket, cancelled), streamed)
