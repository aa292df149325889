"""Binary data frames (docs/protocol.md §4): an 8-byte header then an Arrow IPC message.

The header is 8 bytes so that the IPC message after it stays 8-byte aligned
and can be read in place, without a copy.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import RemoteProtocolError

HEADER = struct.Struct("!B3xI")  # type, 3 reserved zero bytes, stream id
MAX_STREAM_ID = 2**32 - 1


class FrameType(enum.IntEnum):
    SCHEMA = 0x01
    BATCH = 0x02
    END = 0x03


@dataclass(frozen=True, slots=True)
class DataFrame:
    """One binary WebSocket message: type, stream id and payload (a view, never a copy)."""

    type: FrameType
    stream_id: int
    payload: memoryview

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, max_payload: int | None = None) -> "DataFrame":
        """Read a frame from one binary message; raise RemoteProtocolError on garbage."""
        view = memoryview(data)
        if view.format != "B":
            view = view.cast("B")  # an Arrow buffer's view is of signed bytes
        if len(view) < HEADER.size:
            raise RemoteProtocolError(f"binary frame of {len(view)} bytes is shorter than its header")
        kind, stream_id = HEADER.unpack_from(view)
        if view[1] or view[2] or view[3]:
            raise RemoteProtocolError("reserved bytes 1-3 of a binary frame header must be zero")
        try:
            frame_type = FrameType(kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown binary frame type 0x{kind:02x}") from None
        frame = cls(frame_type, stream_id, view[HEADER.size:])
        frame.check(max_payload)
        return frame

    def check(self, max_payload: int | None = None) -> None:
        """Raise RemoteProtocolError if the frame breaks a rule of §4."""
        if not 1 <= self.stream_id <= MAX_STREAM_ID:
            raise RemoteProtocolError(f"stream id {self.stream_id} out of range")
        size = len(self.payload)
        if self.type is FrameType.END and size:
            raise RemoteProtocolError("END frame must have an empty payload")
        if self.type is not FrameType.END and not size:
            raise RemoteProtocolError(f"{self.type.name} frame has an empty payload")
        if max_payload is not None and size > max_payload:
            raise RemoteProtocolError(
                f"{self.type.name} frame payload of {size} bytes exceeds the limit of {max_payload}",
                close_code=1009,
            )

    def serialize(self) -> bytes:
        """Return the frame as one binary message."""
        return HEADER.pack(self.type, self.stream_id) + self.payload


def frame_header(frame_type: FrameType, stream_id: int) -> bytes:
    """Header bytes for a frame, for transports that send header and payload apart."""
    return HEADER.pack(frame_type, stream_id)
