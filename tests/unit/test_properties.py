"""Property-based tests of the core's parsers and state machine (hypothesis)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poc.tunnel import ConnectorEndpoint, DataFrame, FrameType, GatewayEndpoint, Limits, ProtocolError
from poc.tunnel import events as ev
from poc.tunnel.errors import LocalProtocolError, RemoteProtocolError
from poc.tunnel.frames import HEADER
from poc.tunnel.messages import MESSAGE_TYPES, parse_message
from tests.ipc_samples import MIN_BATCH, batch_message, schema_message

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@given(st.binary(max_size=64))
def test_any_bytes_parse_to_a_frame_or_a_remote_protocol_error(data):
    try:
        frame = DataFrame.parse(data, max_payload=32)
    except RemoteProtocolError:
        return
    assert frame.serialize() == data and len(frame.payload) <= 32


@given(st.sampled_from(list(FrameType)), st.integers(1, 2**32 - 1), st.binary(min_size=1, max_size=40))
def test_valid_frames_roundtrip(kind, stream_id, payload):
    payload = b"" if kind is FrameType.END else payload
    frame = DataFrame.parse(DataFrame(kind, stream_id, memoryview(payload)).serialize())
    assert (frame.type, frame.stream_id, bytes(frame.payload)) == (kind, stream_id, payload)


@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                 st.fixed_dictionaries({"action": st.sampled_from(sorted(MESSAGE_TYPES))},
                                       optional={"request_id": json_values, "dataset": json_values,
                                                 "window": json_values, "bytes": json_values,
                                                 "schema": json_values, "rows": json_values,
                                                 "token": json_values, "tenant_id": json_values,
                                                 "version": json_values, "datasets": json_values,
                                                 "code": json_values, "message": json_values}).map(json.dumps)))
def test_any_text_parses_to_a_message_or_a_remote_protocol_error(text):
    try:
        message = parse_message(text)
    except RemoteProtocolError:
        return
    assert parse_message(message.serialize()) == message


@given(st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=40)), max_size=30))
def test_a_registered_gateway_survives_any_input_by_raising_only_protocol_errors(inputs):
    gateway = GatewayEndpoint(Limits(100, 200, 3))
    connector = ConnectorEndpoint()
    connector.register("t", "token-123", [])
    for item in connector.data_to_send():
        gateway.receive_text(item)
    gateway.accept("s", 60)
    gateway.open_stream("sales")
    for item in inputs:
        try:
            if isinstance(item, str):
                gateway.receive_text(item, now=0.0)
            else:
                gateway.receive_binary(item, now=0.0)
        except RemoteProtocolError:
            return


class TunnelPair(RuleBasedStateMachine):
    """Random interleavings of both ends' legal and illegal moves; invariants on credit and streams."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits(max_frame_bytes=400, window_bytes=960, max_streams=4)
        self.gateway, self.connector = GatewayEndpoint(self.limits), ConnectorEndpoint()
        self.connector.register("t", "tok-12345", ["sales"])
        self._move(self.connector, self.gateway)
        self.gateway.accept("s", 60)
        self._move(self.gateway, self.connector)
        self.ended: set[int] = set()
        self.buffered: dict[int, int] = {}

    def _move(self, sender, receiver) -> list[ev.Event]:
        events = []
        for item in sender.data_to_send():
            events += receiver.receive_text(item) if isinstance(item, str) else receiver.receive_binary(item)
        return events

    def _deliver_to_gateway(self) -> None:
        for event in self._move(self.connector, self.gateway):
            if isinstance(event, (ev.SchemaReceived, ev.BatchReceived)):
                self.buffered[event.stream_id] = self.buffered.get(event.stream_id, 0) + len(event.payload)
            if isinstance(event, ev.StreamEnded):
                self.ended.add(event.stream_id)

    @precondition(lambda self: self.gateway.streams_in_flight < 4)
    @rule()
    def open_stream(self):
        self.gateway.open_stream("sales")
        self._move(self.gateway, self.connector)

    @rule(size=st.integers(MIN_BATCH // 8, 50).map(lambda n: n * 8),
          kind=st.sampled_from([FrameType.SCHEMA, FrameType.BATCH, FrameType.END]), pick=st.integers(0, 10))
    def connector_sends(self, size, kind, pick):
        ids = sorted(self.connector.streams)
        if not ids:
            return
        sid = ids[pick % len(ids)]
        payload = {FrameType.SCHEMA: schema_message(), FrameType.BATCH: batch_message(size), FrameType.END: b""}
        try:
            self.connector.send_frame(kind, sid, payload[kind])
        except LocalProtocolError:
            return  # refused locally: nothing was queued
        self._deliver_to_gateway()

    @rule(pick=st.integers(0, 10))
    def gateway_consumes_and_grants(self, pick):
        ids = sorted(self.buffered)
        if ids:
            sid = ids[pick % len(ids)]
            self.gateway.grant_credit(sid, self.buffered.pop(sid))
            self._move(self.gateway, self.connector)

    @rule(pick=st.integers(0, 10))
    def gateway_cancels(self, pick):
        ids = sorted(self.gateway.streams)
        if ids:
            self.gateway.cancel_stream(ids[pick % len(ids)], "client went away")
            self._move(self.gateway, self.connector)
            self._deliver_to_gateway()

    @invariant()
    def credit_never_negative_and_never_above_the_window(self):
        for sid, stream in self.connector.streams.items():
            assert 0 <= stream.credit <= self.limits.window_bytes
            gateway_side = self.gateway.streams.get(sid)
            if gateway_side is not None:
                assert gateway_side.credit == stream.credit  # nothing in flight after each delivery

    @invariant()
    def both_ends_agree_on_open_streams(self):
        assert set(self.connector.streams) == set(self.gateway.streams)


TestTunnelPair = TunnelPair.TestCase


@given(max_frame=st.integers(MIN_BATCH // 8, 200).map(lambda n: n * 8), extra=st.integers(0, 2000),
       sizes=st.lists(st.integers(MIN_BATCH // 8, 200), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_a_caught_up_stream_always_has_credit_for_its_next_frame(max_frame, extra, sizes):
    """§5.4-5.5: however the window compares to max_frame_bytes and however batches vary, once the client has
    read everything the connector may send a frame of any allowed size. The gateway side grants as the bridge
    does: the schema at once, batches once `grant_threshold` bytes were consumed."""
    limits = Limits(max_frame_bytes=max_frame, window_bytes=max_frame + extra, max_streams=1)
    gateway, connector = GatewayEndpoint(limits), ConnectorEndpoint()
    connector.register("t", "tok-12345", ["sales"])
    for event in [*_feed(connector, gateway)]:
        assert isinstance(event, ev.RegisterRequested)
    gateway.accept("s", 60)
    _feed(gateway, connector)
    sid = gateway.open_stream("sales")
    _feed(gateway, connector)
    connector.send_frame(FrameType.SCHEMA, sid, schema_message())
    consumed = 0
    for size in (min(n * 8, max_frame) for n in sizes):
        for event in _feed(connector, gateway):  # the client reads all that arrived
            if isinstance(event, ev.SchemaReceived):
                gateway.grant_credit(sid, len(event.payload))
            elif isinstance(event, ev.BatchReceived):
                consumed += len(event.payload)
                if consumed >= gateway.grant_threshold:
                    gateway.grant_credit(sid, consumed)
                    consumed = 0
        _feed(gateway, connector)
        assert connector.credit(sid) >= max_frame, "stalled: the client is caught up but no frame fits"
        connector.send_frame(FrameType.BATCH, sid, batch_message(max(size, MIN_BATCH)))


def _feed(sender, receiver) -> list[ev.Event]:
    events = []
    for item in sender.data_to_send():
        events += receiver.receive_text(item) if isinstance(item, str) else receiver.receive_binary(item)
    return events
TestTunnelPair.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_protocol_error_is_the_base_of_both_fault_kinds():
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
    assert HEADER.size == 8
