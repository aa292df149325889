"""Real Arrow IPC messages of chosen sizes, for tests of the protocol core (which checks their structure)."""

from __future__ import annotations

import functools

import pyarrow as pa

SCHEMA = pa.schema([("b", pa.binary())])


@functools.cache
def schema_message() -> bytes:
    """The IPC schema message of a one-column binary table."""
    return SCHEMA.serialize().to_pybytes()


def _batch(data_bytes: int) -> bytes:
    return pa.record_batch([pa.array([b"x" * data_bytes], pa.binary())], schema=SCHEMA).serialize().to_pybytes()


MIN_BATCH = len(_batch(0))  # a one-row batch whose value is empty


def batch_message(size: int) -> bytes:
    """A valid record batch message of exactly `size` bytes (a multiple of 8, at least MIN_BATCH)."""
    if size % 8 or size < MIN_BATCH:
        raise ValueError(f"batch messages come in multiples of 8 bytes from {MIN_BATCH}, not {size}")
    message = _batch(size - MIN_BATCH)
    assert len(message) == size
    return message
