"""What the peer did that the application must act on: the events the endpoints return (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from . import messages as m


@dataclass(frozen=True)
class Event:
    """Something the peer did that the application must act on."""


@dataclass(frozen=True)
class RegisterRequested(Event):
    register: m.Register


@dataclass(frozen=True)
class Registered(Event):
    registered: m.Registered


@dataclass(frozen=True)
class RegistrationRefused(Event):
    code: str
    message: str


@dataclass(frozen=True)
class HeartbeatReceived(Event):
    ts: float


@dataclass(frozen=True)
class HeartbeatAcked(Event):
    ts: float


@dataclass(frozen=True)
class FlightInfoRequested(Event):
    request_id: int
    dataset: str
    trace_id: str | None = None
    sql: str | None = None  # 1.5 query_info: the schema of this query's result is asked, not a dataset's
    params: list | None = None  # 1.7: values bound to the query's placeholders (poc.tunnel.params)


@dataclass(frozen=True)
class FlightInfoReceived(Event):
    request_id: int
    schema: bytes
    rows: int
    bytes: int
    parameters: bytes | None = None  # 1.7: the IPC schema of a query's parameters (query_info)


@dataclass(frozen=True)
class StreamRequested(Event):
    stream_id: int
    dataset: str
    window: int
    trace_id: str | None = None
    sql: str | None = None  # 1.5 query: the stream carries this query's result, not a dataset
    params: list | None = None  # 1.7, as in FlightInfoRequested
    from_row: int | None = None  # 1.8: resume the dataset's stream at this row …
    fingerprint: str | None = None  # … if its fingerprint is still this one (§6a)


@dataclass(frozen=True)
class StreamResumable(Event):
    """1.8: the connector can replay this stream's dataset from any row while `fingerprint` holds (§6a)."""
    stream_id: int
    fingerprint: str


@dataclass(frozen=True)
class CreditGranted(Event):
    stream_id: int
    bytes: int


@dataclass(frozen=True)
class StreamCancelled(Event):
    stream_id: int
    reason: str


@dataclass(frozen=True)
class RequestFailed(Event):
    request_id: int
    code: str
    message: str


@dataclass(frozen=True)
class SchemaReceived(Event):
    stream_id: int
    payload: memoryview


@dataclass(frozen=True)
class BatchReceived(Event):
    stream_id: int
    payload: memoryview
    charge: int = 0  # the credit it cost: its size, or what it decompresses to as well (§4b)
    rows: int = 0  # the batch's rows, as its IPC header says (a resumed stream starts after them, §6a)


@dataclass(frozen=True)
class RequestRefused(Event):
    """The gateway sent a request this end cannot take (§3c); an `error` for it is queued, the link goes on."""

    request_id: int
    reason: str


@dataclass(frozen=True)
class GoAwayReceived(Event):
    reason: str
    prefer: str | None = None


@dataclass(frozen=True)
class StreamEnded(Event):
    stream_id: int


@dataclass(frozen=True)
class StreamRejected(Event):
    """The connector sent a frame that is not an acceptable Arrow IPC message (§4a): the gateway cancelled
    the stream; its client must see an error."""

    stream_id: int
    reason: str
