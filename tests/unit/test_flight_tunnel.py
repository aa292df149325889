"""The Flight tunnel's own pieces (docs/protocol.md §13): FlightData read field by field, data call commands,
the close message, and the sink that holds a data call's thread back."""

from __future__ import annotations

import asyncio

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poc import errors
from poc.gateway.sinks import FlowSink, StreamItem
from poc.protowire import write_varint
from poc.transports import flight_tunnel as ft
from poc.tunnel import RemoteProtocolError


def flight_data(command: bytes | None = None, metadata: bytes | None = None) -> bytes:
    """What pyarrow's Flight client writes: a FlightData protobuf with a CMD descriptor and/or app_metadata."""
    import pyarrow.flight as flight

    out = b""
    if command is not None:
        descriptor = flight.FlightDescriptor.for_command(command).serialize()
        out += b"\x0a" + write_varint(len(descriptor)) + descriptor
    if metadata is not None:
        out += ft.metadata_message(metadata)
    return out


def test_flight_data_gives_its_command_and_metadata():
    assert ft.read_flight_data(flight_data(b"poc.tunnel.v1.control")) == (b"poc.tunnel.v1.control", b"")
    command, metadata = ft.read_flight_data(flight_data(metadata=b'{"action": "heartbeat", "ts": 1}'))
    assert command is None and bytes(metadata) == b'{"action": "heartbeat", "ts": 1}'


@pytest.mark.parametrize("message, reason", [
    (b"\x12\x03abc", "only as app_metadata"),  # data_header
    (write_varint(1000 << 3 | 2) + b"\x01x", "only as app_metadata"),  # data_body
    (b"\x1a\x01a\x1a\x01b", "not allowed"),  # app_metadata twice
    (b"\x22\x01a", "not allowed"),  # an unknown field
    (b"\x18\x01", "not allowed"),  # app_metadata with the wrong wire type
    (b"\x1a\x05ab", "past the end"),
    (b"\x0a\x02\x08\x01", "must be a command"),  # a PATH descriptor
    (b"\x1a\xff\xff\xff\xff\xff\xff", "malformed"),
], ids=["data-header", "data-body", "twice", "unknown", "wire-type", "short", "path", "varint"])
def test_anything_but_a_command_and_app_metadata_is_refused(message, reason):
    with pytest.raises(RemoteProtocolError, match=reason):
        ft.read_flight_data(message)


@given(st.binary(max_size=64))
def test_any_bytes_are_flight_data_or_a_protocol_error(data):
    try:
        ft.read_flight_data(data)
    except RemoteProtocolError:
        pass


def test_a_data_command_names_one_session_and_stream():
    assert ft.read_data_command(ft.data_command("sess_1", 7)) == ("sess_1", 7)
    for bad in (b"not json", b"[1]", b'{"session_id": "s"}', b'{"session_id": 1, "request_id": 2}',
                b'{"session_id": "s", "request_id": true}', b'{"session_id": "s", "request_id": 0}',
                b'{"session_id": "s", "request_id": 2, "x": 1}', b'{"session_id": "' + b"s" * 300 + b'", "request_id": 1}'):
        with pytest.raises(ValueError):
            ft.read_data_command(bad)


def test_the_close_message_carries_the_code_and_reason():
    closed = ft.read_close(ft.close_message(4002, "replaced by a new registration"))
    assert (closed.code, closed.reason) == (4002, "replaced by a new registration")
    assert ft.read_close(b"close x").code == 4000


def test_a_flow_sink_holds_the_data_call_back_until_its_reader_takes():
    """Full, the sink holds its writer (the data call's offer on the event loop, and through it HTTP/2) until the
    reader, a Flight thread, makes room; closed, it lets the writer go and takes nothing more."""

    async def scenario() -> None:
        sink = FlowSink(4)
        assert await sink.offer(StreamItem.BATCH, ("a", 3), 3)
        second = asyncio.ensure_future(sink.offer(StreamItem.BATCH, ("b", 3), 3))
        await asyncio.sleep(0.2)
        assert not second.done()  # 3 + 3 > 4: it waits
        taken = await asyncio.to_thread(sink.get, 1)  # the reader is another thread
        assert taken == (StreamItem.BATCH, ("a", 3))
        assert await asyncio.wait_for(second, 2) is True
        assert await asyncio.to_thread(sink.get, 1) == (StreamItem.BATCH, ("b", 3))
        assert await sink.offer(StreamItem.BATCH, ("big", 9), 9)  # an empty sink takes any one message
        waiting = asyncio.ensure_future(sink.offer(StreamItem.BATCH, ("c", 1), 1))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await asyncio.to_thread(sink.close)
        assert await asyncio.wait_for(waiting, 2) is False
        assert not await sink.offer(StreamItem.BATCH, ("d", 1), 1)
        assert sink.get(1) == (StreamItem.BATCH, ("big", 9))  # what it held is still handed on
        with pytest.raises(errors.TimedOut):
            sink.get(0.3)

    asyncio.run(scenario())


def test_a_flow_sink_reader_leaves_when_its_client_does():
    sink = FlowSink(4)
    gone = threading.Event()
    threading.Timer(0.1, gone.set).start()
    with pytest.raises(errors.Cancelled):
        sink.get(10, gone.is_set)
