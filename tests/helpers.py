"""Plain pyarrow.flight client calls shared by the tests."""

from __future__ import annotations

import pyarrow.flight as flight


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


def reset_peak_rss(pid: int) -> int:
    """Start a new peak: Linux resets a process's VmHWM to its current RSS when 5 is written to its clear_refs
    (its owner, or root, may). Returns the RSS now, in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")
    return peak_rss(pid)


def peak_rss(pid: int) -> int:
    """The process's peak RSS (VmHWM) since it started or since `reset_peak_rss`, in bytes: what it held at
    its worst, also if it gave the memory back before it was looked at."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")
