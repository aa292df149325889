"""Plain pyarrow.flight client calls shared by the tests."""

from __future__ import annotations

import pyarrow.flight as flight

from poc.workbook.servers.runner import peak_rss, reset_peak_rss  # noqa: F401 (the tests' memory checks)


def bearer(token: str, tenant_id: str | None = None, timeout: float = 30.0) -> flight.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    if tenant_id is not None:
        headers.append((b"tenant-id", tenant_id.encode()))
    return flight.FlightCallOptions(headers=headers, timeout=timeout)


def sales(name: str = "sales") -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_path("dataset", name)


def read(uri: str, token: str, name: str = "sales"):
    """GetFlightInfo then DoGet, as a plain pyarrow.flight client does."""
    with flight.connect(uri) as client:
        options = bearer(token)
        info = client.get_flight_info(sales(name), options)
        return info, client.do_get(info.endpoints[0].ticket, options).read_all()

