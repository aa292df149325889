"""The gateway's Flight service: thin handlers over the tunnel bridge; auth is middleware."""

from __future__ import annotations

import pyarrow.flight as flight

from ..auth import BearerAuthFactory, TicketSigner, caller_tenant, dataset_from_descriptor
from ..config import TenantCredentials
from .bridge import TunnelBridge


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

    def get_flight_info(self, context, descriptor):
        return self._info(caller_tenant(context), dataset_from_descriptor(descriptor), descriptor)

    def list_flights(self, context, criteria):
        tenant = caller_tenant(context)
        for name in self._bridge.datasets(tenant):
            yield self._info(tenant, name, flight.FlightDescriptor.for_path("dataset", name))

    def list_actions(self, context):
        return []  # an authenticated call that touches no data: the load client's connect probe

    def do_get(self, context, ticket):
        tenant = caller_tenant(context)
        stream = self._bridge.open_stream(tenant, self._tickets.redeem(ticket.ticket, tenant))
        return flight.GeneratorStream(stream.schema, stream.batches())
