"""The structure of one encapsulated Arrow IPC message, checked before any Arrow library reads it.

docs/protocol.md §4a: a SCHEMA frame carries a Schema message and a BATCH frame a RecordBatch message,
uncompressed unless a codec was negotiated (§4b), whose buffers all lie inside its body. This module reads only the few flatbuffer fields
that decide that (Arrow's `format/Message.fbs`), with every offset bounds-checked, so that hostile bytes
can be refused here; Arrow's own full validation of the decoded batch (bounds of offsets, UTF-8) runs
after it, at the gateway. No pyarrow, no flatbuffers library: struct only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONTINUATION = 0xFFFFFFFF
PREFIX = struct.Struct("<Ii")  # continuation marker, metadata length
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")

# CompressionType (Message.fbs): the codecs a link may negotiate (protocol 1.4, §4b)
CODECS = {"lz4": 0, "zstd": 1}
_I8 = struct.Struct("<b")

# MessageHeader union (Message.fbs)
SCHEMA, DICTIONARY_BATCH, RECORD_BATCH = 1, 2, 3
_HEADER_NAMES = {1: "Schema", 2: "DictionaryBatch", 3: "RecordBatch", 4: "Tensor", 5: "SparseTensor"}


class InvalidMessage(ValueError):
    """The payload is not an acceptable Arrow IPC message; the text says why."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What the structure check learned: the header kind, the batch's row count and its body size."""

    header_type: int
    length: int  # rows of a RecordBatch; 0 for a Schema
    body_length: int
    charge: int = 0  # credit the frame costs (§4b): its size, plus every buffer's decompressed size if compressed


class _Table:
    """One flatbuffer table inside `buf`, every read bounds-checked."""

    __slots__ = ("buf", "pos", "_vt", "_vt_size")

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vt = pos - _read(_I32, buf, pos)
        vt_size = _read(_U16, buf, vt)
        if vt_size < 4 or vt_size % 2:
            raise InvalidMessage("flatbuffer vtable is malformed")
        _need(buf, vt, vt_size)
        self._vt, self._vt_size = vt, vt_size

    def _field(self, index: int) -> int:
        """Absolute position of field `index`, or 0 when absent."""
        slot = 4 + 2 * index
        if slot + 2 > self._vt_size:
            return 0
        offset = _read(_U16, self.buf, self._vt + slot)
        return self.pos + offset if offset else 0

    def scalar(self, index: int, fmt: struct.Struct, default: int = 0) -> int:
        at = self._field(index)
        return _read(fmt, self.buf, at) if at else default

    def table(self, index: int) -> "_Table | None":
        at = self._field(index)
        return _Table(self.buf, at + _read(_U32, self.buf, at)) if at else None

    def struct_vector(self, index: int, item_size: int) -> tuple[int, int]:
        """(position of the first item, count) of a vector of structs; (0, 0) when absent."""
        at = self._field(index)
        if not at:
            return 0, 0
        start = at + _read(_U32, self.buf, at)
        count = _read(_U32, self.buf, start)
        _need(self.buf, start + 4, count * item_size)
        return start + 4, count


def _need(buf: memoryview, pos: int, size: int) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise InvalidMessage("flatbuffer offset points outside the message metadata")


def _read(fmt: struct.Struct, buf: memoryview, pos: int) -> int:
    _need(buf, pos, fmt.size)
    return fmt.unpack_from(buf, pos)[0]


def check_message(payload: bytes | bytearray | memoryview, expected: int, codec: str | None = None) -> MessageInfo:
    """Check one SCHEMA (`expected=SCHEMA`) or BATCH (`expected=RECORD_BATCH`) payload; raise InvalidMessage.
    A batch may have a compressed body only when `codec` (negotiated for the link) is given, and with it."""
    view = memoryview(payload)
    if len(view) < PREFIX.size:
        raise InvalidMessage(f"IPC message of {len(view)} bytes is shorter than its prefix")
    marker, meta_len = PREFIX.unpack_from(view)
    if marker != CONTINUATION:
        raise InvalidMessage("IPC message does not start with the continuation marker 0xFFFFFFFF")
    if meta_len <= 0 or meta_len % 8 or PREFIX.size + meta_len > len(view):
        raise InvalidMessage(f"IPC metadata length {meta_len} is not a positive multiple of 8 within the payload")
    meta = view[PREFIX.size:PREFIX.size + meta_len]
    body_length = len(view) - PREFIX.size - meta_len
    message = _Table(meta, _read(_U32, meta, 0))
    header_type = message.scalar(1, _U8)
    if header_type != expected:
        got = _HEADER_NAMES.get(header_type, f"type {header_type}")
        raise InvalidMessage(f"expected a {_HEADER_NAMES[expected]} message, got {got}")
    declared_body = message.scalar(3, _I64)
    if declared_body != body_length:
        raise InvalidMessage(f"IPC bodyLength {declared_body} does not match the {body_length} bytes that follow")
    header = message.table(2)
    if header is None:
        raise InvalidMessage("IPC message has no header")
    if expected == SCHEMA:
        return MessageInfo(SCHEMA, 0, body_length, len(view))
    return _check_record_batch(header, view[PREFIX.size + meta_len:], codec)


def _check_record_batch(batch: _Table, body: memoryview, codec: str | None) -> MessageInfo:
    body_length = len(body)
    length = batch.scalar(0, _I64)
    if length < 0:
        raise InvalidMessage(f"record batch length {length} is negative")
    compression = batch.table(3)
    if compression is not None:  # BodyCompression (§4b)
        if codec is None:
            raise InvalidMessage("compressed IPC body on a link that negotiated no codec")
        kind, method = compression.scalar(0, _I8), compression.scalar(1, _I8)
        if kind != CODECS[codec] or method != 0:
            raise InvalidMessage(f"IPC body compressed with codec {kind} method {method}, not the link's "
                                 f"{codec} per buffer")
    nodes, node_count = batch.struct_vector(1, 16)
    for i in range(node_count):
        node_length, null_count = struct.unpack_from("<qq", batch.buf, nodes + 16 * i)
        if node_length < 0 or not 0 <= null_count <= node_length:
            raise InvalidMessage(f"field node {i} has length {node_length} and null count {null_count}")
    buffers, buffer_count = batch.struct_vector(2, 16)
    decoded = 0
    for i in range(buffer_count):
        offset, size = struct.unpack_from("<qq", batch.buf, buffers + 16 * i)
        if offset < 0 or size < 0 or offset + size > body_length:
            raise InvalidMessage(f"buffer {i} ({offset}+{size}) lies outside the body of {body_length} bytes")
        if compression is not None and size:
            if size < _I64.size:
                raise InvalidMessage(f"compressed buffer {i} of {size} bytes has no length prefix")
            declared = _I64.unpack_from(body, offset)[0]
            if declared < -1:
                raise InvalidMessage(f"compressed buffer {i} declares {declared} decompressed bytes")
            decoded += max(0, declared)
    return MessageInfo(RECORD_BATCH, length, body_length, PREFIX.size + len(batch.buf) + body_length + decoded)


def charge(payload: bytes | bytearray | memoryview, codec: str | None = None) -> int:
    """The credit a BATCH payload costs (§4b): its size, plus its buffers' decompressed sizes when compressed."""
    return check_message(payload, RECORD_BATCH, codec).charge
