"""The gateway's Flight service: thin handlers over the tunnel bridge; auth is middleware."""

from __future__ import annotations

import functools
import logging

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import BearerAuthFactory, TicketSigner, caller_tenant, dataset_from_descriptor
from ..config import TenantCredentials
from .bridge import TunnelBridge

log = logging.getLogger("poc.gateway")


def clients_see_messages_only(handler):
    """Errors reach clients as Flight or Arrow errors with a message; anything else is a gateway bug, logged
    here with its traceback and shown to the client as an internal error without one (docs/security.md)."""
    @functools.wraps(handler)
    def guarded(self, context, *args):
        try:
            return handler(self, context, *args)
        except (flight.FlightError, pa.ArrowException):
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise flight.FlightInternalError("internal error in the gateway") from None
    return guarded


class GatewayFlightServer(flight.FlightServerBase):
    def __init__(self, location: str, bridge: TunnelBridge, tenants: dict[str, TenantCredentials],
                 tickets: TicketSigner, **kwargs) -> None:
        super().__init__(location, middleware={"auth": BearerAuthFactory(tenants)}, **kwargs)
        self._bridge = bridge
        self._tickets = tickets

    def _info(self, tenant: str, name: str, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        schema, rows, size = self._bridge.flight_info(tenant, name)
        endpoint = flight.FlightEndpoint(self._tickets.issue(tenant, name), [])
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, size)

    @clients_see_messages_only
    def get_flight_info(self, context, descriptor):
        return self._info(caller_tenant(context), dataset_from_descriptor(descriptor), descriptor)

    @clients_see_messages_only
    def list_flights(self, context, criteria):
        tenant = caller_tenant(context)
        return [self._info(tenant, name, flight.FlightDescriptor.for_path("dataset", name))
                for name in self._bridge.datasets(tenant)]

    def list_actions(self, context):
        return []  # an authenticated call that touches no data: the load client's connect probe

    @clients_see_messages_only
    def do_get(self, context, ticket):
        tenant = caller_tenant(context)
        stream = self._bridge.open_stream(tenant, self._tickets.redeem(ticket.ticket, tenant), context.is_cancelled)
        return flight.GeneratorStream(stream.schema, stream.batches())
