"""The Flight SQL messages the gateway reads and writes, decoded from protobuf by hand.

Arrow's `FlightSql.proto` (package `arrow.flight.protocol.sql`) defines them; pyarrow ships no Flight SQL
server and no generated classes. The handful this service needs are flat messages of strings, bytes,
booleans and unsigned integers, so a strict decoder of the protobuf wire format (about a hundred lines)
replaces a generated module and the protobuf runtime it would need: every input is bounded by the Flight
call's size, every length is checked against the bytes left, groups and malformed varints are refused,
strings must be UTF-8, and unknown fields are skipped as protobuf requires (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..protowire import WireError, read_varint, write_varint

TYPE_URL_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
MAX_COMMAND_BYTES = 1 << 20  # a command, action body or ticket larger than this is refused unread


class ProtoError(ValueError):
    """Bytes that are not the protobuf message they claim to be."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(data, pos)
    except WireError as exc:
        raise ProtoError(str(exc)) from None


def decode_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Field number → values in order: ints for varints, bytes for length-delimited fields. Fixed-width
    fields are skipped (no message here has one); groups are refused."""
    if len(data) > MAX_COMMAND_BYTES:
        raise ProtoError(f"message of {len(data)} bytes, over the limit of {MAX_COMMAND_BYTES}")
    data = bytes(data)
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            if size > len(data) - pos:
                raise ProtoError(f"field {number} claims {size} bytes, {len(data) - pos} left")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise ProtoError(f"truncated fixed-width field {number}")
            continue
        else:
            raise ProtoError(f"wire type {wire} (groups) is not supported")
        fields.setdefault(number, []).append(value)
    return fields


def encode_fields(*fields: tuple[int, int | bytes | str | None]) -> bytes:
    """Fields in order; None is left out, ints are varints, str and bytes length-delimited."""
    out = bytearray()
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, int):
            out += write_varint(number << 3) + write_varint(value)
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            out += write_varint(number << 3 | 2) + write_varint(len(raw)) + raw
    return bytes(out)


def pack_any(message: "Message") -> bytes:
    """The message as a `google.protobuf.Any` of its Flight SQL type, as commands, tickets and action
    bodies carry it."""
    return encode_fields((1, TYPE_URL_PREFIX + message.NAME), (2, message.encode()))


def unpack_any(data: bytes) -> "Message | None":
    """A Flight SQL message from an `Any`; None when the bytes are not an Any of a Flight SQL type (a
    `dataset` ticket, say). Raises ProtoError for a Flight SQL type this service does not know, or bytes
    that do not decode as its message."""
    try:
        fields = decode_fields(data)
        type_url = _text(fields, 1)
    except ProtoError:
        return None
    if not type_url or not type_url.startswith(TYPE_URL_PREFIX) or set(fields) - {1, 2}:
        return None
    name = type_url[len(TYPE_URL_PREFIX):]
    cls = MESSAGES.get(name)
    if cls is None:
        raise UnknownCommand(name)
    body = fields.get(2, [b""])[-1]
    if not isinstance(body, bytes):
        raise ProtoError("Any.value is not bytes")
    return cls.decode(body)


class UnknownCommand(ProtoError):
    """A Flight SQL message type this service does not implement."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Flight SQL {name[:100]} is not supported by this server")
        self.name = name


def _last(fields: dict, number: int, kind: type):
    values = fields.get(number)
    if not values:
        return None
    value = values[-1]  # proto3: the last occurrence of a scalar wins
    if not isinstance(value, kind):
        raise ProtoError(f"field {number} has the wrong wire type")
    return value


def _text(fields: dict, number: int) -> str | None:
    value = _last(fields, number, bytes)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError(f"field {number} is not valid UTF-8") from None


def _texts(fields: dict, number: int) -> list[str]:
    out = []
    for value in fields.get(number, []):
        if not isinstance(value, bytes):
            raise ProtoError(f"field {number} has the wrong wire type")
        try:
            out.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtoError(f"field {number} is not valid UTF-8") from None
    return out


def _uint32s(fields: dict, number: int) -> list[int]:
    """A repeated uint32, packed (one length-delimited run of varints) or not."""
    out = []
    for value in fields.get(number, []):
        if isinstance(value, int):
            out.append(value)
            continue
        pos = 0
        while pos < len(value):
            item, pos = _varint(value, pos)
            out.append(item)
    if any(v >= 2**32 for v in out):
        raise ProtoError(f"field {number} holds a value past uint32")
    return out


_READERS = {"text": lambda f, n: _text(f, n) or "", "text?": _text, "bytes": lambda f, n: _last(f, n, bytes) or b"",
            "bytes?": lambda f, n: _last(f, n, bytes), "texts": lambda f, n: tuple(_texts(f, n)),
            "uint32s": lambda f, n: tuple(_uint32s(f, n)), "bool": lambda f, n: bool(_last(f, n, int))}


@dataclass(frozen=True)
class Message:
    """A Flight SQL message; subclasses name their proto type and list their fields as (number, attribute,
    kind): text, text? (optional), bytes, bytes?, texts and uint32s (repeated), bool."""

    NAME = ""
    FIELDS: typing.ClassVar[tuple[tuple[int, str, str], ...]] = ()

    @classmethod
    def decode(cls, body: bytes) -> "Message":
        fields = decode_fields(body)
        return cls(**{name: _READERS[kind](fields, number) for number, name, kind in cls.FIELDS})

    def encode(self) -> bytes:
        out = []
        for number, name, kind in self.FIELDS:
            value = getattr(self, name)
            if kind in ("texts", "uint32s"):
                out += [(number, v) for v in value]
            elif kind == "bool":
                out.append((number, int(value) or None))
            else:  # proto3: a default scalar is left out; an optional one is left out when unset
                out.append((number, value if value or kind.endswith("?") else None))
        return encode_fields(*out)


_QUERY = ((1, "query", "text"), (2, "transaction_id", "bytes?"))


@dataclass(frozen=True)
class CommandStatementQuery(Message):
    NAME, FIELDS = "CommandStatementQuery", _QUERY
    query: str = ""
    transaction_id: bytes | None = None


@dataclass(frozen=True)
class ActionCreatePreparedStatementRequest(Message):
    NAME, FIELDS = "ActionCreatePreparedStatementRequest", _QUERY
    query: str = ""
    transaction_id: bytes | None = None


@dataclass(frozen=True)
class TicketStatementQuery(Message):
    NAME, FIELDS = "TicketStatementQuery", ((1, "statement_handle", "bytes"),)
    statement_handle: bytes = b""


@dataclass(frozen=True)
class CommandPreparedStatementQuery(Message):
    NAME, FIELDS = "CommandPreparedStatementQuery", ((1, "prepared_statement_handle", "bytes"),)
    prepared_statement_handle: bytes = b""


@dataclass(frozen=True)
class ActionClosePreparedStatementRequest(Message):
    NAME, FIELDS = "ActionClosePreparedStatementRequest", ((1, "prepared_statement_handle", "bytes"),)
    prepared_statement_handle: bytes = b""


@dataclass(frozen=True)
class ActionCreatePreparedStatementResult(Message):
    NAME = "ActionCreatePreparedStatementResult"
    FIELDS = ((1, "prepared_statement_handle", "bytes"), (2, "dataset_schema", "bytes"),
              (3, "parameter_schema", "bytes"))
    prepared_statement_handle: bytes = b""
    dataset_schema: bytes = b""
    parameter_schema: bytes = b""


@dataclass(frozen=True)
class DoPutPreparedStatementResult(Message):
    NAME, FIELDS = "DoPutPreparedStatementResult", ((1, "prepared_statement_handle", "bytes?"),)
    prepared_statement_handle: bytes | None = None


@dataclass(frozen=True)
class CommandGetSqlInfo(Message):
    NAME, FIELDS = "CommandGetSqlInfo", ((1, "info", "uint32s"),)
    info: tuple[int, ...] = ()


@dataclass(frozen=True)
class CommandGetCatalogs(Message):
    NAME = "CommandGetCatalogs"


@dataclass(frozen=True)
class CommandGetTableTypes(Message):
    NAME = "CommandGetTableTypes"


@dataclass(frozen=True)
class CommandGetDbSchemas(Message):
    NAME, FIELDS = "CommandGetDbSchemas", ((1, "catalog", "text?"), (2, "db_schema_filter_pattern", "text?"))
    catalog: str | None = None
    db_schema_filter_pattern: str | None = None


@dataclass(frozen=True)
class CommandGetTables(Message):
    NAME = "CommandGetTables"
    FIELDS = ((1, "catalog", "text?"), (2, "db_schema_filter_pattern", "text?"),
              (3, "table_name_filter_pattern", "text?"), (4, "table_types", "texts"), (5, "include_schema", "bool"))
    catalog: str | None = None
    db_schema_filter_pattern: str | None = None
    table_name_filter_pattern: str | None = None
    table_types: tuple[str, ...] = ()
    include_schema: bool = False


@dataclass(frozen=True)
class _TableKeys(Message):
    """CommandGetPrimaryKeys, CommandGetExportedKeys, CommandGetImportedKeys: datasets have no keys."""
    FIELDS = ((1, "catalog", "text?"), (2, "db_schema", "text?"), (3, "table", "text"))
    catalog: str | None = None
    db_schema: str | None = None
    table: str = ""


class CommandGetPrimaryKeys(_TableKeys):
    NAME = "CommandGetPrimaryKeys"


class CommandGetExportedKeys(_TableKeys):
    NAME = "CommandGetExportedKeys"


class CommandGetImportedKeys(_TableKeys):
    NAME = "CommandGetImportedKeys"


@dataclass(frozen=True)
class CommandGetCrossReference(Message):
    NAME = "CommandGetCrossReference"


@dataclass(frozen=True)
class _Write(Message):
    """Statements that change data; decoded only to be refused (the service is read-only)."""


class CommandStatementUpdate(_Write):
    NAME = "CommandStatementUpdate"


class CommandPreparedStatementUpdate(_Write):
    NAME = "CommandPreparedStatementUpdate"


class CommandStatementIngest(_Write):
    NAME = "CommandStatementIngest"


MESSAGES: dict[str, type[Message]] = {
    cls.NAME: cls for cls in (
        CommandStatementQuery, TicketStatementQuery, CommandPreparedStatementQuery,
        ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
        ActionClosePreparedStatementRequest, DoPutPreparedStatementResult, CommandGetSqlInfo, CommandGetCatalogs,
        CommandGetTableTypes, CommandGetDbSchemas, CommandGetTables, CommandGetPrimaryKeys, CommandGetExportedKeys,
        CommandGetImportedKeys, CommandGetCrossReference, CommandStatementUpdate,
        CommandPreparedStatementUpdate, CommandStatementIngest)
}

assert all(dataclasses.is_dataclass(cls) for cls in MESSAGES.values())
