"""The project's errors (poc.errors) as the Flight errors a client sees: the one mapping, used by the Flight
servers' handlers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight

from . import errors

FLIGHT = {errors.NotFound: pa.ArrowKeyError, errors.InvalidRequest: pa.ArrowInvalid,
          errors.Forbidden: flight.FlightUnauthorizedError, errors.Unavailable: flight.FlightUnavailableError,
          errors.TimedOut: flight.FlightTimedOutError, errors.Cancelled: flight.FlightCancelledError,
          errors.Unsupported: pa.ArrowNotImplementedError, errors.SourceFailed: flight.FlightServerError,
          errors.Internal: flight.FlightInternalError}


def for_flight(exc: errors.CallError) -> Exception:
    """The Flight (or Arrow) error of the same kind and message."""
    return FLIGHT.get(type(exc), flight.FlightInternalError)(str(exc))


def flight_error(code: str, message: str, source: str) -> Exception:
    """The Flight error for an error `code` of a request that `source` answered (poc.errors.from_code)."""
    return for_flight(errors.from_code(code, message, source))
