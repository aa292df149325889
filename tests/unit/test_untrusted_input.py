"""What a hostile connector can send, refused by the protocol core before any Arrow library reads it."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poc.tunnel import CloseCode, FrameType, Limits, RemoteProtocolError
from poc.tunnel import events as ev
from poc.tunnel import ipc
from poc.tunnel.frames import HEADER
from poc.tunnel.messages import MAX_TEXT_CHARS, parse_message, valid_dataset_name
from tests.ipc_samples import MIN_BATCH, batch_message, schema_message
from tests.unit.test_core import registered_pair

LIMITS = Limits(max_frame_bytes=4096, window_bytes=8192, max_streams=3, unsolicited_per_s=5)


def ipc_stream_messages(batch: pa.RecordBatch, **options) -> list[bytes]:
    """The messages pyarrow's stream writer produces (dictionaries, compression) for one batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_batch(batch)
    return [m.serialize().to_pybytes() for m in pa.ipc.MessageReader.open_stream(sink.getvalue())]


def streaming_pair():
    gateway, connector = registered_pair(LIMITS)
    sid = gateway.open_stream("sales")
    gateway.data_to_send()
    gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, sid) + schema_message(), now=0.0)
    return gateway, sid


# -- the structure of IPC messages

def test_real_messages_pass_the_structure_check():
    assert ipc.check_message(schema_message(), ipc.SCHEMA).header_type == ipc.SCHEMA
    info = ipc.check_message(batch_message(MIN_BATCH + 80), ipc.RECORD_BATCH)
    assert info.length == 1 and info.body_length > 0


@pytest.mark.parametrize("make, reason", [
    (lambda: ipc_stream_messages(pa.record_batch({"x": pa.array([0] * 4096)}), compression="zstd")[1],
     "compressed IPC body on a link that negotiated no codec"),
    (lambda: ipc_stream_messages(pa.record_batch({"x": pa.array(["a", "b"]).dictionary_encode()}))[1],
     "got DictionaryBatch"),
    (lambda: schema_message(), "got Schema"),
    (lambda: batch_message(MIN_BATCH)[:-8], "does not match"),
    (lambda: batch_message(MIN_BATCH) + b"\0" * 8, "does not match"),
    (lambda: b"\x00" * 64, "continuation marker"),
    (lambda: b"\xff\xff\xff\xff\x00\x10\x00\x00" + b"\0" * 16, "within the payload"),
], ids=["zstd-bomb", "dictionary-batch", "schema-as-batch", "truncated-body", "trailing-bytes", "no-marker",
        "metadata-past-the-end"])
def test_unacceptable_batches_are_refused_with_the_reason(make, reason):
    with pytest.raises(ipc.InvalidMessage, match=reason):
        ipc.check_message(make(), ipc.RECORD_BATCH)


def test_a_buffer_outside_the_body_is_refused():
    message = bytearray(batch_message(MIN_BATCH + 64))
    body_length = ipc.check_message(message, ipc.RECORD_BATCH).body_length
    # the data buffer's Buffer struct: its length is the value 64 (the 64-byte value), patch it past the body
    at = message.rfind((64).to_bytes(8, "little"), 8, len(message) - body_length)
    message[at:at + 8] = (body_length + 1).to_bytes(8, "little")
    with pytest.raises(ipc.InvalidMessage, match="outside the body"):
        ipc.check_message(message, ipc.RECORD_BATCH)


@given(st.binary(max_size=300), st.sampled_from([ipc.SCHEMA, ipc.RECORD_BATCH]))
@settings(max_examples=500)
def test_any_bytes_are_a_message_or_invalid_message(data, kind):
    try:
        ipc.check_message(data, kind)
    except ipc.InvalidMessage:
        pass


@given(st.data())
@settings(max_examples=300)
def test_corrupted_real_messages_never_raise_anything_else(data):
    message = bytearray(batch_message(MIN_BATCH + 40))
    for _ in range(data.draw(st.integers(1, 6))):
        message[data.draw(st.integers(0, len(message) - 1))] = data.draw(st.integers(0, 255))
    try:
        ipc.check_message(message, ipc.RECORD_BATCH)
    except ipc.InvalidMessage:
        pass


# -- the gateway's core on hostile frames

def test_an_invalid_batch_ends_its_stream_not_the_link():
    gateway, sid = streaming_pair()
    bomb = ipc_stream_messages(pa.record_batch({"x": pa.array([0] * 4096)}), compression="zstd")[1]
    [event] = gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + bomb, now=0.0)
    assert isinstance(event, ev.StreamRejected) and "compressed" in event.reason
    [cancel] = gateway.data_to_send()
    assert json.loads(cancel)["action"] == "cancel" and gateway.streams_in_flight == 0
    assert gateway.open_stream("sales") > sid  # the link goes on


def test_frames_on_the_wire_when_a_cancel_crossed_them_are_free_within_the_remaining_credit():
    gateway, sid = streaming_pair()
    gateway.cancel_stream(sid, "client left")
    left = LIMITS.window_bytes - len(schema_message())
    frame = HEADER.pack(FrameType.BATCH, sid) + batch_message(1000)
    for _ in range(left // 1000):  # more than the unsolicited burst (10), all within the credit
        assert gateway.receive_binary(frame, now=0.0) == []
    with pytest.raises(RemoteProtocolError) as info:  # beyond the credit they count, and a flood is closed
        for _ in range(20):
            gateway.receive_binary(frame, now=0.0)
    assert info.value.close_code == CloseCode.LIMIT_EXCEEDED


def test_late_replies_are_dropped_not_a_protocol_error():
    gateway, _ = registered_pair(LIMITS)
    rid = gateway.request_flight_info("sales")
    gateway.forget_request(rid)  # the gateway's request timed out
    late = json.dumps({"action": "flight_info", "request_id": rid, "schema": "", "rows": 1, "bytes": 1})
    assert gateway.receive_text(late, now=0.0) == []
    assert gateway.receive_text(json.dumps({"action": "error", "request_id": rid, "code": "x", "message": "y"}),
                                now=0.0) == []


def test_connector_error_texts_are_cut():
    gateway, _ = registered_pair(LIMITS)
    sid = gateway.open_stream("sales")
    [event] = gateway.receive_text(json.dumps({"action": "error", "request_id": sid, "code": "internal",
                                               "message": "x" * 100_000}))
    assert len(event.message) == MAX_TEXT_CHARS


@pytest.mark.parametrize("text, reason", [
    ('{"action":"register","tenant_id":"t","token":"\\ud800","version":"1","datasets":[]}', "valid Unicode"),
    ("[" * 100_000, "nested too deeply"),
    ('{"action":"heartbeat","ts":1e999}', "finite"),
    ('{"action":"flight_info","request_id":1,"schema":"","rows":99999999999999999999,"bytes":1}', "int64"),
    ('{"action":"flight_info","request_id":1,"schema":"","rows":-2,"bytes":1}', "negative"),
    ('{"action":"register","tenant_id":"t","token":"x","version":"1","datasets":["../etc"]}', "dataset name"),
], ids=["lone-surrogate", "deep-nesting", "infinite-float", "huge-int", "negative-rows", "bad-dataset-name"])
def test_control_messages_are_checked_strictly(text, reason):
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        parse_message(text)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("name, ok", [("sales", True), ("sales_2024.v2", True), ("_x", True), ("a" * 128, True),
                                      ("", False), ("a" * 129, False), ("../x", False), (".hidden", False),
                                      ("-x", False), ("a b", False), ("ventas€", False)])
def test_dataset_names(name, ok):
    assert valid_dataset_name(name) is ok


def test_registered_announces_the_control_message_limit():
    gateway, connector = registered_pair(LIMITS)
    assert connector.registered.max_message_bytes == LIMITS.max_message_bytes


def test_a_connector_refuses_impossible_limits():
    from poc.tunnel import ConnectorEndpoint

    connector = ConnectorEndpoint()
    connector.register("t", "token-123", [])
    bad = json.dumps({"action": "registered", "session_id": "s", "heartbeat_s": 0, "max_frame_bytes": 10,
                      "window_bytes": 5, "max_streams": 1})
    with pytest.raises(RemoteProtocolError, match="impossible limits"):
        connector.receive_text(bad)


def test_a_schema_too_large_for_the_gateways_message_limit_is_answered_with_an_error():
    gateway, connector = registered_pair(Limits(max_frame_bytes=4096, window_bytes=8192, max_message_bytes=2048))
    rid = gateway.request_flight_info("sales")
    connector.receive_text(gateway.data_to_send()[0])
    connector.reply_flight_info(rid, b"s" * 4096, rows=1, size=1)
    [reply] = connector.data_to_send()
    [event] = gateway.receive_text(reply)
    assert isinstance(event, ev.RequestFailed) and event.code == "invalid_request" and "message limit" in event.message
