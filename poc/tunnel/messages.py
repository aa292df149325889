"""Control messages: JSON objects in WebSocket text frames (docs/protocol.md §3)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass

from . import params as bound
from .errors import RemoteProtocolError

PROTOCOL_VERSION = "1"
INT64_MAX = 2**63 - 1
MAX_TEXT_CHARS = 1024  # connector-provided texts (error messages) are cut to this before a client sees them
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # §3a
TRACE_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


def valid_dataset_name(name: object) -> bool:
    """A dataset name of §3a: 1-128 ASCII letters, digits, `_`, `-` or `.`, not starting with `-` or `.`."""
    return isinstance(name, str) and DATASET_NAME.fullmatch(name) is not None


def clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, marked when cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_text(value: object) -> bool:
    """A str that is valid Unicode: JSON lets a lone surrogate (`"\\ud800"`) through, UTF-8 does not."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX - 1 <= value <= INT64_MAX


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_OMITTED_WHEN_NONE = {"trace_id", "connector_id", "prefer", "codecs", "codec", "sql", "max_params", "params",
                      "parameters", "resume", "from_row", "fingerprint"}  # optional fields of later minor versions are left out when unset


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Message:
    """A control message; subclasses set ACTION and declare their fields."""

    ACTION: typing.ClassVar[str] = ""

    def serialize(self) -> str:
        """Return the message as the text of one WebSocket text frame."""
        body = {"action": self.ACTION}
        for name in _field_names(type(self)):  # fields hold plain values: no deep copy (dataclasses.asdict)
            value = getattr(self, name)
            if value is not None or name not in _OMITTED_WHEN_NONE:
                body[name] = value
        return _ENCODER.encode(body)


@dataclass(frozen=True)
class Register(Message):
    ACTION = "register"
    tenant_id: str
    token: str
    version: str
    datasets: list[str]
    connector_id: str | None = None  # 1.3: the same for every tunnel of one connector process (§2)
    codecs: list[str] | None = None  # 1.4: IPC body codecs it can send, best first; present: it answers ping
    sql: str | None = None  # 1.5: the SQL dialect its query and query_info speak ("duckdb"); absent: no SQL
    max_params: int | None = None  # 1.7: the most parameters it binds to one query (§3d); absent: none
    resume: bool | None = None  # 1.8: it can resume a dataset's stream from a row (§6a)

    def __repr__(self) -> str:  # tokens never reach logs
        return (f"Register(tenant_id={self.tenant_id!r}, version={self.version!r}, datasets={self.datasets!r}, "
                f"connector_id={self.connector_id!r}, codecs={self.codecs!r}, sql={self.sql!r}, "
                f"max_params={self.max_params!r}, resume={self.resume!r})")


@dataclass(frozen=True)
class Registered(Message):
    ACTION = "registered"
    session_id: str
    heartbeat_s: float
    max_frame_bytes: int
    window_bytes: int
    max_streams: int
    status: str = "ok"
    max_message_bytes: int = 1024 * 1024  # added in 1.1: the largest control message the gateway accepts
    codec: str | None = None  # 1.4: the codec the connector may compress batch bodies with; absent: none
    resume: bool | None = None  # 1.8: this gateway resumes streams: say which are replayable (§6a)


@dataclass(frozen=True)
class Ping(Message):
    """1.4, gateway to connector: answer with a pong of the same seq, ahead of queued data (§5b)."""
    ACTION = "ping"
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    ACTION = "pong"
    seq: int


@dataclass(frozen=True)
class Heartbeat(Message):
    ACTION = "heartbeat"
    ts: float = 0.0


@dataclass(frozen=True)
class HeartbeatAck(Message):
    ACTION = "heartbeat_ack"
    ts: float = 0.0


@dataclass(frozen=True)
class GetFlightInfo(Message):
    ACTION = "get_flight_info"
    request_id: int
    dataset: str
    trace_id: str | None = None  # 1.2: the Flight call's x-request-id, for logs at both ends (§3)


@dataclass(frozen=True)
class FlightInfoReply(Message):
    ACTION = "flight_info"
    request_id: int
    schema: str  # base64 of the Arrow IPC schema message
    rows: int
    bytes: int
    # 1.7, answering a query_info: base64 of the IPC schema of its parameters (§3d); any text, unlike `str | None`
    parameters: typing.Optional[str] = None


@dataclass(frozen=True)
class DoGet(Message):
    ACTION = "do_get"
    request_id: int
    dataset: str
    window: int
    trace_id: str | None = None  # 1.2, as in GetFlightInfo
    from_row: int | None = None  # 1.8: a resumed stream: start at this row of the dataset (§6a) …
    fingerprint: str | None = None  # … if the dataset is still the one this fingerprint names


@dataclass(frozen=True)
class Resumable(Message):
    """1.8, connector to gateway, before a stream's SCHEMA: the dataset it streams can be replayed from any row
    while its fingerprint is unchanged (§6a)."""
    ACTION = "resumable"
    request_id: int
    fingerprint: str


@dataclass(frozen=True)
class QueryInfo(Message):
    """1.5, only to connectors whose register named a `sql` dialect: the schema of a query's result, answered
    with flight_info (rows and bytes -1) or error, without running the query (§3b)."""
    ACTION = "query_info"
    request_id: int
    sql: str
    trace_id: str | None = None
    params: list | None = None  # 1.7: values bound to its placeholders (§3d)


@dataclass(frozen=True)
class Query(Message):
    """1.5: run a query and stream its result as stream `request_id`, exactly as a do_get's (§3b)."""
    ACTION = "query"
    request_id: int
    sql: str
    window: int
    trace_id: str | None = None
    params: list | None = None  # 1.7, as in query_info


@dataclass(frozen=True)
class Credit(Message):
    ACTION = "credit"
    request_id: int
    bytes: int


@dataclass(frozen=True)
class Cancel(Message):
    ACTION = "cancel"
    request_id: int
    reason: str = ""


@dataclass(frozen=True)
class GoAway(Message):
    """1.3, gateway to connector: this gateway is about to close the link (drain, rebalance); open a tunnel
    to another gateway first. Sent only on links whose register carried a connector_id (§2)."""
    ACTION = "goaway"
    reason: str = ""
    prefer: str | None = None  # the tunnel URL of a gateway with room, as the connector may know it


@dataclass(frozen=True)
class Error(Message):
    ACTION = "error"
    code: str
    message: str
    request_id: int | None = None
    status: str = "error"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.ACTION: cls
    for cls in (Register, Registered, Heartbeat, HeartbeatAck, GetFlightInfo,
                FlightInfoReply, DoGet, QueryInfo, Query, Credit, Cancel, GoAway, Ping, Pong, Error, Resumable)
}

_CHECKS = {
    "str": _is_text,
    "int": _is_int,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "list[str]": lambda v: isinstance(v, list) and all(_is_text(x) for x in v),
    "list[str] | None": lambda v: v is None or (isinstance(v, list) and len(v) <= 16
                                                and all(_is_text(x) and len(x) <= 32 for x in v)),
    "int | None": lambda v: v is None or _is_int(v),
    "str | None": lambda v: v is None or (_is_text(v) and TRACE_ID.fullmatch(v) is not None),
    "typing.Optional[str]": lambda v: v is None or _is_text(v),
    "bool | None": lambda v: v is None or isinstance(v, bool),
    "list | None": lambda v: v is None or isinstance(v, list),  # checked by poc.tunnel.params below
}
_NAMED = {"datasets", "dataset"}  # fields that hold dataset names (§3a)
_NON_NEGATIVE = {"window", "max_frame_bytes", "window_bytes", "max_streams", "max_message_bytes", "seq", "max_params",
                 "from_row"}


REQUESTS = ("get_flight_info", "query_info", "do_get", "query")  # what the gateway asks; the connector answers


def request_id_of(text: str | bytes) -> int | None:
    """The request id of a gateway request (§3) that failed to parse, when it can still be read: then only that
    request is refused (an `error` for it), not the link (§3c). None for anything else."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("action") not in REQUESTS:
        return None
    request_id = body.get("request_id")
    return request_id if _is_int(request_id) and 1 <= request_id < 2**32 else None


def parse_message(text: str | bytes) -> Message:
    """Parse one text frame; raise RemoteProtocolError with the reason if it is not a valid message."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"control message is not valid JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("control message is nested too deeply") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("control message must be a JSON object")
    action = body.get("action")
    cls = MESSAGE_TYPES.get(action) if isinstance(action, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown action {action!r}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING:
                raise RemoteProtocolError(f"{action}: missing field {f.name!r}")
            continue
        value = body[f.name]
        if not _CHECKS[f.type](value):
            raise RemoteProtocolError(f"{action}: field {f.name!r} must be {f.type} (ints within int64, finite "
                                      f"numbers, valid Unicode), got {type(value).__name__}")
        if f.name in _NAMED and not all(map(valid_dataset_name, value if isinstance(value, list) else [value])):
            raise RemoteProtocolError(f"{action}: {f.name!r} holds a name that is not a dataset name (§3a)")
        if f.name in _NON_NEGATIVE and value is not None and value < 0 or f.name in ("rows", "bytes") and value < -1:
            raise RemoteProtocolError(f"{action}: field {f.name!r} must not be negative")
        if f.name == "fingerprint" and not TRACE_ID.fullmatch(value or "x"):
            raise RemoteProtocolError(f"{action}: a fingerprint is 1 to 128 printable ASCII characters")
        if f.name == "params" and value is not None:
            try:
                bound.check(value)
            except bound.ParamError as exc:
                raise RemoteProtocolError(f"{action}: {exc}") from None
        values[f.name] = value
    message = cls(**values)
    request_id = values.get("request_id")
    if request_id is not None and not 1 <= request_id < 2**32:
        raise RemoteProtocolError(f"{action}: request_id {request_id} out of range")
    return message
