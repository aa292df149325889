"""Control messages: JSON objects in WebSocket text frames (docs/protocol.md §3)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

from .errors import RemoteProtocolError

PROTOCOL_VERSION = "1"


@dataclass(frozen=True)
class Message:
    """A control message; subclasses set ACTION and declare their fields."""

    ACTION: typing.ClassVar[str] = ""

    def serialize(self) -> str:
        """Return the message as the text of one WebSocket text frame."""
        body = {"action": self.ACTION}
        body.update(dataclasses.asdict(self))
        return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True)
class Register(Message):
    ACTION = "register"
    tenant_id: str
    token: str
    version: str
    datasets: list[str]

    def __repr__(self) -> str:  # tokens never reach logs
        return f"Register(tenant_id={self.tenant_id!r}, version={self.version!r}, datasets={self.datasets!r})"


@dataclass(frozen=True)
class Registered(Message):
    ACTION = "registered"
    session_id: str
    heartbeat_s: float
    max_frame_bytes: int
    window_bytes: int
    max_streams: int
    status: str = "ok"


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


@dataclass(frozen=True)
class FlightInfoReply(Message):
    ACTION = "flight_info"
    request_id: int
    schema: str  # base64 of the Arrow IPC schema message
    rows: int
    bytes: int


@dataclass(frozen=True)
class DoGet(Message):
    ACTION = "do_get"
    request_id: int
    dataset: str
    window: int


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
class Error(Message):
    ACTION = "error"
    code: str
    message: str
    request_id: int | None = None
    status: str = "error"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.ACTION: cls
    for cls in (Register, Registered, Heartbeat, HeartbeatAck, GetFlightInfo,
                FlightInfoReply, DoGet, Credit, Cancel, Error)
}

_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "int | None": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
}


def parse_message(text: str | bytes) -> Message:
    """Parse one text frame; raise RemoteProtocolError with the reason if it is not a valid message."""
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"control message is not valid JSON: {exc}") from None
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
            raise RemoteProtocolError(f"{action}: field {f.name!r} must be {f.type}, got {type(value).__name__}")
        values[f.name] = value
    message = cls(**values)
    request_id = values.get("request_id")
    if request_id is not None and not 1 <= request_id < 2**32:
        raise RemoteProtocolError(f"{action}: request_id {request_id} out of range")
    return message
