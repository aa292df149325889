"""The baseline: the same datasets and delay served straight over Flight, no tunnel."""

from __future__ import annotations

import random
import time

import pyarrow as pa
import pyarrow.flight as flight

from .auth import BearerAuthFactory, TicketSigner, caller_tenant, dataset_from_descriptor
from .catalog import Dataset
from .config import TenantCredentials


class DirectFlightServer(flight.FlightServerBase):
    """Plain Flight over the same in-memory datasets; every tenant sees the same data."""

    def __init__(self, location: str, datasets: dict[str, Dataset], tenants: dict[str, TenantCredentials] | None,
                 delay_ms: tuple[float, float] = (0.0, 0.0), **kwargs) -> None:
        middleware = {"auth": BearerAuthFactory(tenants)} if tenants else {}  # same auth as the gateway
        super().__init__(location, middleware=middleware, **kwargs)
        self._datasets = datasets
        self._tables = {name: ds.table() for name, ds in datasets.items()}
        self._delay_ms = delay_ms
        self._tickets = TicketSigner()
        self._authenticated = bool(tenants)

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

    def get_flight_info(self, context, descriptor):
        ds = self._dataset(dataset_from_descriptor(descriptor))
        return self._flight_info(self._tenant(context), ds, descriptor)

    def list_flights(self, context, criteria):
        tenant = self._tenant(context)
        for ds in self._datasets.values():
            yield self._flight_info(tenant, ds, flight.FlightDescriptor.for_path("dataset", ds.name))

    def list_actions(self, context):
        return []  # an authenticated call that touches no data: the load client's connect probe

    def do_get(self, context, ticket):
        name = self._tickets.redeem(ticket.ticket, self._tenant(context))
        table = self._tables[self._dataset(name).name]
        low, high = self._delay_ms
        if high > 0:
            time.sleep(random.uniform(low, high) / 1000)
        return flight.RecordBatchStream(table)
