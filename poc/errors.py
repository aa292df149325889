"""The project's own errors for a call that fails, raised anywhere below the handlers and mapped once at each
surface: to Flight errors by the Flight servers (poc.flight_errors.for_flight), to HTTP statuses by
poc.http_arrow. Each names what happened in words a client can act on; its class says which kind it is."""

from __future__ import annotations


class CallError(Exception):
    """A call ends with this error. `code` is its kind, as in docs/protocol.md §9 where the protocol has one."""

    code = "internal"


class NotFound(CallError):
    code = "not_found"


class InvalidRequest(CallError):
    code = "invalid_request"


class Forbidden(CallError):
    code = "forbidden"


class Unavailable(CallError):
    """Retry: later, or on another gateway (offline tenant, a share or cap reached, shutting down)."""

    code = "unavailable"


class TimedOut(CallError):
    code = "timed_out"


class Cancelled(CallError):
    """The client left or cancelled."""

    code = "cancelled"


class Unsupported(CallError):
    code = "unsupported"


class SourceFailed(CallError):
    """The connector or the data source failed the request (any other code of §9)."""

    code = "source_failed"


class Internal(CallError):
    """Something the gateway cannot vouch for: a connector broke the protocol or Arrow's rules, or a bug."""


def from_code(code: str, message: str, source: str) -> CallError:
    """The error a client sees for an error `code` of a request (docs/protocol.md §9) that `source` answered:
    not found, invalid request and forbidden as they are; timed out and unavailable naming `source`; anything
    else a failure of `source` naming its code."""
    if code in _AS_IS:
        return _AS_IS[code](message)
    if code in _NAMING_SOURCE:
        return _NAMING_SOURCE[code](f"{source}: {message}")
    return SourceFailed(f"{source} failed the request ({code[:40]}): {message}")


_AS_IS = {cls.code: cls for cls in (NotFound, InvalidRequest, Forbidden)}
_NAMING_SOURCE = {cls.code: cls for cls in (TimedOut, Unavailable)}
