"""The protocol core, bytes in and events out: two endpoints joined by a fake link, no sockets."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pytest

import poc.tunnel
from poc.gateway.bridge import _as_arrow, _in_arrow_memory
from poc.tunnel import (CloseCode, ConnectorEndpoint, DataFrame, FlowControlError, FrameType, GatewayEndpoint,
                        Limits, LocalProtocolError, RemoteProtocolError, StreamEvent, StreamState, TRANSITIONS)
from poc.tunnel import events as ev
from poc.tunnel.frames import HEADER
from poc.tunnel.messages import DoGet, Register, parse_message
from poc.tunnel.streams import Stream
from tests.ipc_samples import MIN_BATCH, batch_message, schema_message

LIMITS = Limits(max_frame_bytes=400, window_bytes=800, max_streams=3)
SCHEMA = schema_message()  # 120 bytes


def deliver(sender, receiver) -> list[ev.Event]:
    """The fake link: move everything `sender` queued into `receiver`."""
    events = []
    for item in sender.data_to_send():
        events += receiver.receive_text(item) if isinstance(item, str) else receiver.receive_binary(item)
    return events


def registered_pair(limits: Limits = LIMITS) -> tuple[GatewayEndpoint, ConnectorEndpoint]:
    gateway, connector = GatewayEndpoint(limits), ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"])
    [req] = deliver(connector, gateway)
    assert isinstance(req, ev.RegisterRequested) and req.register.tenant_id == "t1"
    gateway.accept("sess_1", heartbeat_s=60)
    [done] = deliver(gateway, connector)
    assert isinstance(done, ev.Registered) and done.registered.session_id == "sess_1"
    return gateway, connector


# -- frames

def test_frame_roundtrip_keeps_the_payload_as_a_view():
    data = DataFrame(FrameType.BATCH, 7, memoryview(b"ipc-bytes")).serialize()
    assert len(data) == HEADER.size + 9 and HEADER.size == 8
    frame = DataFrame.parse(data)
    assert (frame.type, frame.stream_id, bytes(frame.payload)) == (FrameType.BATCH, 7, b"ipc-bytes")
    assert frame.payload.obj is data  # no copy of the body


def test_a_frame_in_arrow_memory_is_read_in_place_and_handed_to_flight_as_arrow_memory():
    """picows' frames are copied into Arrow buffers (poc.transports.picows_ws): read as unsigned bytes, their
    payload is a view of that buffer, and the gateway gives Flight a slice of it, never Python's memory, so the
    frame can be freed in any thread once Flight is done (poc.gateway.bridge)."""
    data = pa.allocate_buffer(HEADER.size + 3)
    memoryview(data).cast("B")[:] = DataFrame(FrameType.BATCH, 2**31 + 5, memoryview(b"\xff\x80a")).serialize()
    frame = DataFrame.parse(data)
    assert frame.stream_id == 2**31 + 5 and frame.payload.obj is data and frame.payload[0] == 0xFF
    arrow = _as_arrow(frame.payload)
    assert _in_arrow_memory(frame.payload) and arrow.to_pybytes() == b"\xff\x80a" and arrow.parent is not None
    assert not _in_arrow_memory(memoryview(b"xy")) and _as_arrow(memoryview(b"xyz")[1:]).to_pybytes() == b"yz"


@pytest.mark.parametrize("data, match", [
    (b"\x02\x00\x00", "shorter than its header"),
    (b"\x09\x00\x00\x00\x00\x00\x00\x01x", "unknown binary frame type 0x09"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00x", "stream id 0 out of range"),
    (b"\x03\x00\x00\x00\x00\x00\x00\x01x", "END frame must have an empty payload"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x01", "BATCH frame has an empty payload"),
])
def test_bad_frames_are_rejected(data, match):
    with pytest.raises(RemoteProtocolError, match=match):
        DataFrame.parse(data)


def test_oversized_frame_is_rejected_with_1009():
    with pytest.raises(RemoteProtocolError) as info:
        DataFrame.parse(HEADER.pack(2, 1) + b"x" * 101, max_payload=100)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


# -- messages

@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"action": "launch"}', "unknown action 'launch'"),
    ('{"tenant_id": "t"}', "unknown action None"),
    ('{"action": "do_get", "request_id": 1, "window": 5}', "missing field 'dataset'"),
    ('{"action": "do_get", "request_id": "1", "dataset": "s", "window": 5}', "'request_id' must be int"),
    ('{"action": "do_get", "request_id": true, "dataset": "s", "window": 5}', "'request_id' must be int"),
    ('{"action": "do_get", "request_id": 0, "dataset": "s", "window": 5}', "out of range"),
    ('{"action": "register", "tenant_id": "t", "token": "x", "version": "1", "datasets": [1]}', "list\\[str\\]"),
])
def test_bad_control_messages_are_rejected_with_the_reason(text, match):
    with pytest.raises(RemoteProtocolError, match=match):
        parse_message(text)


def test_message_roundtrip_and_unknown_fields_are_ignored():
    message = DoGet(request_id=5, dataset="sales", window=1024)
    body = json.loads(message.serialize())
    assert body == {"action": "do_get", "request_id": 5, "dataset": "sales", "window": 1024}
    assert parse_message(json.dumps({**body, "future_field": 1})) == message


def test_register_repr_hides_the_token():
    assert "secret" not in repr(Register("t", "secret", "1", []))


# -- stream states

def test_state_table_allows_only_the_documented_moves():
    stream = Stream(1, "sales", 10)
    for event in (StreamEvent.SCHEMA, StreamEvent.BATCH, StreamEvent.BATCH, StreamEvent.END):
        stream.advance(event)
    assert stream.state is StreamState.CLOSED and TRANSITIONS[StreamState.CLOSED] == {}
    with pytest.raises(LocalProtocolError, match="cannot cancel stream 1 in state CLOSED"):
        stream.advance(StreamEvent.CANCEL)


def test_batch_before_schema_is_illegal():
    with pytest.raises(LocalProtocolError, match="cannot batch stream 1 in state OPEN"):
        Stream(1, "sales", 10).advance(StreamEvent.BATCH)


# -- endpoints over the fake link

def test_register_then_flight_info_roundtrip():
    gateway, connector = registered_pair()
    rid = gateway.request_flight_info("sales")
    [asked] = deliver(gateway, connector)
    assert asked == ev.FlightInfoRequested(rid, "sales")
    connector.reply_flight_info(rid, b"schema-bytes", rows=10, size=99)
    [info] = deliver(connector, gateway)
    assert info == ev.FlightInfoReceived(rid, b"schema-bytes", 10, 99)


def test_stream_delivers_schema_batches_and_end_in_order():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("sales")
    [req] = deliver(gateway, connector)
    assert req == ev.StreamRequested(sid, "sales", LIMITS.window_bytes)
    connector.send_frame(FrameType.SCHEMA, sid, SCHEMA)
    connector.send_frame(FrameType.BATCH, sid, batch_message(200))
    connector.send_frame(FrameType.END, sid)
    events = deliver(connector, gateway)
    assert [type(e) for e in events] == [ev.SchemaReceived, ev.BatchReceived, ev.StreamEnded]
    assert bytes(events[1].payload) == batch_message(200)
    assert gateway.streams_in_flight == 0 and connector.credit(sid) == -1


def test_connector_cannot_send_beyond_its_credit_until_granted():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("sales")
    deliver(gateway, connector)
    connector.send_frame(FrameType.SCHEMA, sid, SCHEMA)
    connector.send_frame(FrameType.BATCH, sid, batch_message(400))
    connector.send_frame(FrameType.BATCH, sid, batch_message(280))
    assert connector.credit(sid) == 0
    with pytest.raises(LocalProtocolError, match="with only 0 bytes of credit"):
        connector.send_frame(FrameType.BATCH, sid, batch_message(MIN_BATCH))
    deliver(connector, gateway)
    gateway.grant_credit(sid, 150)
    assert deliver(gateway, connector) == [ev.CreditGranted(sid, 150)]
    assert connector.credit(sid) == 150


def test_gateway_closes_a_connector_that_sends_beyond_credit():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("sales")
    deliver(gateway, connector)
    gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, sid) + SCHEMA)
    gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + batch_message(400))
    gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + batch_message(280))
    with pytest.raises(FlowControlError) as info:
        gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + batch_message(MIN_BATCH))
    assert info.value.close_code == CloseCode.FLOW_CONTROL


def test_cancel_stops_the_stream_and_late_frames_are_dropped():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("sales")
    deliver(gateway, connector)
    connector.send_frame(FrameType.SCHEMA, sid, SCHEMA)
    in_flight = connector.data_to_send()
    gateway.cancel_stream(sid, "client went away")
    assert deliver(gateway, connector) == [ev.StreamCancelled(sid, "client went away")]
    assert connector.credit(sid) == -1
    with pytest.raises(LocalProtocolError, match="not open"):
        connector.send_frame(FrameType.BATCH, sid, batch_message(MIN_BATCH))
    assert gateway.receive_binary(in_flight[0]) == []  # crossed the cancel on the wire


def test_frames_for_a_stream_never_opened_are_a_protocol_error():
    gateway, _ = registered_pair()
    with pytest.raises(RemoteProtocolError, match="never opened"):
        gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, 42) + b"s")


def test_a_connector_can_only_answer_requests_the_gateway_sent():
    gateway, _ = registered_pair()
    forged = json.dumps({"action": "flight_info", "request_id": 9, "schema": "", "rows": 1, "bytes": 1})
    # 9 was never issued; a late reply to an issued request is another matter (test_late_replies_...)
    with pytest.raises(RemoteProtocolError, match="did not send"):
        gateway.receive_text(forged)
    with pytest.raises(RemoteProtocolError, match="never sent"):
        gateway.receive_text(json.dumps({"action": "error", "request_id": 9, "code": "x", "message": "y"}))


@pytest.mark.parametrize("first", [
    json.dumps({"action": "heartbeat"}),
    json.dumps({"action": "flight_info", "request_id": 1, "schema": "", "rows": 1, "bytes": 1}),
    HEADER.pack(FrameType.SCHEMA, 1) + b"s",
])
def test_nothing_but_register_comes_first(first):
    gateway = GatewayEndpoint(LIMITS)
    with pytest.raises(RemoteProtocolError, match="before register"):
        gateway.receive_text(first) if isinstance(first, str) else gateway.receive_binary(first)


def test_refused_registration_is_reported_to_the_connector():
    gateway, connector = GatewayEndpoint(LIMITS), ConnectorEndpoint()
    connector.register("t1", "bad", [])
    deliver(connector, gateway)
    gateway.refuse("unauthenticated", "invalid token for tenant 't1'")
    assert deliver(gateway, connector) == [ev.RegistrationRefused("unauthenticated", "invalid token for tenant 't1'")]


def test_streams_in_flight_are_limited():
    gateway, _ = registered_pair()
    for _ in range(LIMITS.max_streams):
        gateway.open_stream("sales")
    with pytest.raises(LocalProtocolError, match="limit 3"):
        gateway.open_stream("sales")


def test_heartbeat_is_acknowledged():
    gateway, connector = registered_pair()
    connector.heartbeat(12.5)
    assert deliver(connector, gateway) == [ev.HeartbeatReceived(12.5)]
    assert deliver(gateway, connector) == [ev.HeartbeatAcked(12.5)]


def test_connector_error_fails_the_stream():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("missing")
    deliver(gateway, connector)
    connector.fail_request(sid, "not_found", "dataset 'missing' not found")
    assert deliver(connector, gateway) == [ev.RequestFailed(sid, "not_found", "dataset 'missing' not found")]
    assert gateway.streams_in_flight == 0


def test_flight_info_schema_must_be_base64():
    gateway, _ = registered_pair()
    rid = gateway.request_flight_info("sales")
    bad = json.dumps({"action": "flight_info", "request_id": rid, "schema": "@@@", "rows": 1, "bytes": 1})
    with pytest.raises(RemoteProtocolError, match="base64"):
        gateway.receive_text(bad)


def test_window_must_hold_a_full_frame():
    with pytest.raises(ValueError, match="at least max_frame_bytes"):
        Limits(max_frame_bytes=10, window_bytes=5)


def test_protocol_core_imports_no_io_library():
    forbidden = {"asyncio", "socket", "websockets", "grpc", "threading", "selectors", "ssl", "pyarrow"}
    for path in Path(poc.tunnel.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_register_carries_a_connector_id_only_when_given():
    assert "connector_id" not in json.loads(Register("t1", "secret-token", "1", ["sales"]).serialize())
    gateway, connector = GatewayEndpoint(LIMITS), ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"], connector_id="c-42")
    [req] = deliver(connector, gateway)
    assert req.register.connector_id == "c-42"
    with pytest.raises(RemoteProtocolError, match="connector_id"):
        parse_message('{"action": "register", "tenant_id": "t", "token": "x", "version": "1", "datasets": [], '
                      '"connector_id": "has space"}')


def test_goaway_reaches_the_connector_and_nothing_is_sent_before_registration():
    gateway, connector = registered_pair()
    gateway.goaway("gateway draining")
    assert deliver(gateway, connector) == [ev.GoAwayReceived("gateway draining")]
    fresh = GatewayEndpoint(LIMITS)
    fresh.goaway("draining")  # not registered: nothing to say it to
    assert not fresh.has_data_to_send
    with pytest.raises(RemoteProtocolError, match="goaway"):
        gateway.receive_text('{"action": "goaway", "reason": "a connector has no say"}')


@pytest.mark.parametrize("request_text, reason", [
    ({"action": "do_get", "request_id": 7, "dataset": "../etc/passwd", "window": 800}, "not a dataset name"),
    ({"action": "get_flight_info", "request_id": 8, "dataset": "x" * 200}, "not a dataset name"),
    ({"action": "do_get", "request_id": 9, "dataset": "sales", "window": 10}, "below max_frame_bytes"),
    ({"action": "query", "request_id": 10, "sql": 42, "window": 800}, "'sql' must be str"),
    ({"action": "do_get", "request_id": 11, "dataset": "sales"}, "missing field 'window'"),
])
def test_a_request_the_connector_cannot_take_is_refused_alone_and_the_link_goes_on(request_text, reason):
    """A gateway whose ticket secret leaked could be made to send anything: the connector answers that
    request with an error for its id (§3c) and keeps serving, never closing its whole link."""
    gateway, connector = registered_pair()
    rid = request_text["request_id"]
    [refused] = connector.receive_text(json.dumps(request_text))
    assert isinstance(refused, ev.RequestRefused) and refused.request_id == rid and reason in refused.reason
    [error] = connector.data_to_send()
    assert json.loads(error)["request_id"] == rid and json.loads(error)["code"] == "invalid_request"
    assert reason in json.loads(error)["message"]
    sid = gateway.open_stream("sales")  # the link serves on
    [opened] = deliver(gateway, connector)
    assert isinstance(opened, ev.StreamRequested) and opened.stream_id == sid


@pytest.mark.parametrize("text", [
    '{"action": "do_get", "request_id": "7", "dataset": "../x", "window": 800}',  # the id cannot be read
    '{"action": "cancel", "request_id": 7, "reason": 5}',  # not a request
    '{"action": "do_get", "request_id": 7, "dataset": "sales", "window": 800',  # not JSON
])
def test_what_is_not_a_readable_request_still_closes_the_link(text):
    _, connector = registered_pair()
    with pytest.raises(RemoteProtocolError):
        connector.receive_text(text)


def test_a_request_reusing_an_open_streams_id_still_closes_the_link():
    gateway, connector = registered_pair()
    sid = gateway.open_stream("sales")
    deliver(gateway, connector)
    with pytest.raises(RemoteProtocolError, match="reuses the id"):
        connector.receive_text(json.dumps({"action": "do_get", "request_id": sid, "dataset": "sales",
                                           "window": 800}))
    with pytest.raises(RemoteProtocolError):
        connector.receive_text(json.dumps({"action": "do_get", "request_id": sid, "dataset": "../x",
                                           "window": 800}))


# -- streams that survive a dropped tunnel (§6a, 1.8)

def resuming_pair(connector_resumes: bool = True, gateway_resumes: bool = True):
    gateway, connector = GatewayEndpoint(LIMITS), ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"], resume=connector_resumes)
    deliver(connector, gateway)
    gateway.accept("sess_1", heartbeat_s=60, resume=gateway_resumes)
    deliver(gateway, connector)
    return gateway, connector


def test_a_replayable_stream_is_named_and_resumed_from_a_row():
    gateway, connector = resuming_pair()
    assert gateway.resumes and connector.resumes
    sid = gateway.open_stream("sales")
    [requested] = deliver(gateway, connector)
    connector.resumable(sid, "48211936-17-1000")
    connector.send_frame(FrameType.SCHEMA, sid, schema_message())
    connector.send_frame(FrameType.BATCH, sid, batch_message(MIN_BATCH))
    resumable, schema, batch = deliver(connector, gateway)  # the control message leaves first
    assert resumable == ev.StreamResumable(sid, "48211936-17-1000")
    assert isinstance(schema, ev.SchemaReceived) and batch.rows == 1  # rows read from the batch's IPC header
    again = gateway.open_stream("sales", from_row=batch.rows, fingerprint="48211936-17-1000")
    [resumed] = deliver(gateway, connector)
    assert (resumed.stream_id, resumed.from_row, resumed.fingerprint) == (again, batch.rows, "48211936-17-1000")
    assert requested.from_row is None and requested.fingerprint is None


@pytest.mark.parametrize("connector_resumes, gateway_resumes", [(False, True), (True, False)])
def test_nothing_is_resumed_unless_both_ends_said_so(connector_resumes, gateway_resumes):
    gateway, connector = resuming_pair(connector_resumes, gateway_resumes)
    sid = gateway.open_stream("sales")
    deliver(gateway, connector)
    connector.resumable(sid, "f")
    assert connector.data_to_send() == []  # not named: the gateway did not ask
    with pytest.raises(poc.tunnel.LocalProtocolError, match="not asked to resume"):
        gateway.open_stream("sales", from_row=5, fingerprint="f")


def test_a_resumable_for_a_stream_never_opened_or_a_bad_fingerprint_breaks_the_protocol():
    gateway, _ = resuming_pair()
    with pytest.raises(poc.tunnel.RemoteProtocolError, match="never opened"):
        gateway.receive_text('{"action":"resumable","request_id":99,"fingerprint":"f"}')
    sid = gateway.open_stream("sales")
    with pytest.raises(poc.tunnel.RemoteProtocolError, match="printable ASCII"):
        gateway.receive_text(json.dumps({"action": "resumable", "request_id": sid, "fingerprint": "a b"}))
