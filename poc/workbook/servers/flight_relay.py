"""A plain Arrow Flight relay: the bench's reference for what any two-hop path costs with these libraries.

It serves Flight and answers each call by making the same call to an upstream Flight server: GetFlightInfo is
passed through, a DoGet's batches are read from upstream with pyarrow's Flight client and sent on with its
Flight server, all in C++ (no Python per batch, no checks, no tunnel). It receives and sends every byte, as the
gateway does, at the least cost these libraries allow: what it spends per GB is what a gateway could hope to
spend (`python -m poc bench` measures it beside the tunnels). The caller's `authorization` header is handed
upstream unchanged; the upstream server decides. A measurement tool for loopback, not a product part.
"""

from __future__ import annotations

import pyarrow.flight as flight

AUTHORIZATION = "authorization"


class _Caller(flight.ServerMiddleware):
    def __init__(self, authorization: str | None) -> None:
        self.authorization = authorization


class _CallerFactory(flight.ServerMiddlewareFactory):
    """Keeps each call's authorization header, to be passed upstream."""

    def start_call(self, info, headers):
        values = headers.get(AUTHORIZATION) or []
        return _Caller(values[0] if values else None)


class FlightRelay(flight.FlightServerBase):
    """Flight at `location`, every call made again to `upstream`."""

    def __init__(self, location: str, upstream: str) -> None:
        super().__init__(location, middleware={"caller": _CallerFactory()})
        self._upstream = flight.connect(upstream)

    def _options(self, context) -> flight.FlightCallOptions:
        caller = context.get_middleware("caller")
        headers = [(AUTHORIZATION.encode(), caller.authorization.encode())] if caller.authorization else []
        return flight.FlightCallOptions(headers=headers)

    def get_flight_info(self, context, descriptor):
        return self._upstream.get_flight_info(descriptor, self._options(context))

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self._upstream.do_get(ticket, self._options(context)).to_reader())
