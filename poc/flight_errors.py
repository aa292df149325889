"""The project's error codes (docs/protocol.md §9) as the Flight errors a client sees."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight


def flight_error(code: str, message: str, source: str) -> Exception:
    """The error a Flight client sees for an error `code` of a query or request (docs/protocol.md §9):
    not found → KeyError, invalid request → ArrowInvalid, forbidden → unauthorized, timed out → timed out,
    anything else a server error naming `source` and the code."""
    if code == "not_found":
        return pa.ArrowKeyError(message)
    if code == "invalid_request":
        return pa.ArrowInvalid(message)
    if code == "forbidden":
        return flight.FlightUnauthorizedError(message)
    if code == "timed_out":
        return flight.FlightTimedOutError(f"{source}: {message}")
    if code == "unavailable":
        return flight.FlightUnavailableError(f"{source}: {message}")
    return flight.FlightServerError(f"{source} failed the request ({code[:40]}): {message}")
