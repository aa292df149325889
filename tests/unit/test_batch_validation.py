"""The gateway's check of each batch: bounds and offsets at every level of nesting, read as binary."""

from __future__ import annotations

import struct

import pyarrow as pa
import pytest

from poc.gateway.arrow_checks import bounds_schema
from poc.tunnel import ipc


def test_string_types_are_read_as_their_binary_twins_at_every_depth():
    schema = pa.schema([("a", pa.string()), ("b", pa.list_(pa.large_string())),
                        ("c", pa.struct([("x", pa.string()), ("y", pa.int32())])),
                        ("d", pa.map_(pa.string(), pa.list_(pa.string(), 2))), ("e", pa.float64())])
    bounds = bounds_schema(schema)
    assert [str(f.type) for f in bounds] == [
        "binary", "list<item: large_binary>", "struct<x: binary, y: int32>",
        "map<binary, fixed_size_list<item: binary>[2]>", "double"]
    assert bounds_schema(pa.schema([("n", pa.int64())])).equals(pa.schema([("n", pa.int64())]))


def with_buffer_value(message: bytes, buffer_index: int, at: int, value: int) -> bytes:
    """The message with the int32 at position `at` of buffer `buffer_index` (a body offset) set to `value`."""
    meta_len = struct.unpack_from("<i", message, 4)[0]
    meta = memoryview(message)[8:8 + meta_len]
    batch = ipc._Table(meta, struct.unpack_from("<I", meta, 0)[0]).table(2)
    first, _ = batch.struct_vector(2, 16)
    offset, _ = struct.unpack_from("<qq", meta, first + 16 * buffer_index)
    patched = bytearray(message)
    struct.pack_into("<i", patched, 8 + meta_len + offset + 4 * at, value)
    return bytes(patched)


def test_an_inner_string_offset_past_its_data_is_caught_in_a_list():
    schema = pa.schema([("v", pa.list_(pa.string()))])
    batch = pa.record_batch([pa.array([["a", "bc"], ["def"]], pa.list_(pa.string()))], schema=schema)
    # buffers: list validity, list offsets, string validity, string offsets, string data
    bad = with_buffer_value(batch.serialize().to_pybytes(), 3, 3, 10_000)
    message = pa.ipc.read_message(pa.py_buffer(bad))
    with pytest.raises(pa.ArrowInvalid, match="offset"):
        pa.ipc.read_record_batch(message, bounds_schema(schema)).validate(full=True)
