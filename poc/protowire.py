"""Protobuf's wire format at its smallest: varints, read strictly and bounded, and written. The one codec both the
Flight tunnel's FlightData (poc.transports.flight_tunnel) and the Flight SQL commands (poc.sql.proto) are read with."""

from __future__ import annotations


class WireError(ValueError):
    """Bytes that break the wire format: a varint cut short or longer than allowed."""


def read_varint(data, pos: int, max_bytes: int = 10) -> tuple[int, int]:
    """The varint at `pos` of `data` (bytes or a memoryview) and the position after it; WireError if it is cut
    short or takes more than `max_bytes` bytes (10 hold any 64-bit value)."""
    value = shift = 0
    end = min(len(data), pos + max_bytes)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    if pos >= len(data) and shift < 7 * max_bytes:
        raise WireError("truncated varint")
    raise WireError(f"varint longer than {max_bytes} bytes")


def write_varint(value: int) -> bytes:
    """`value` (not negative) as a varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
