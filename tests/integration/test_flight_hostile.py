"""Attacks on what only the Flight tunnel has (docs/protocol.md §13): the calls' headers, data calls that name a
stream, Flight's own data fields. Each runs inside test_hostile_connectors' `attack`: the honest tenant is read
throughout and after, exactly, from the same gateway process."""

from __future__ import annotations

import struct
import threading

import grpc
import pyarrow.flight as flight
import pytest

import tests.integration.test_hostile_connectors as hostile
from poc.protowire import write_varint
from poc.transports import flight_tunnel
from tests.helpers import bearer, peak_rss, reset_peak_rss, sales
from tests.hostile import _END as END_OF_CALL
from tests.hostile import INTS, STRINGS, RawConnector, flight_headers, frame, strings_batch

attack = hostile.attack  # the honest tenant's reads around every attack, and the checks after it
registered, attacker_reads, _bomb = hostile.registered, hostile.attacker_reads, hostile._bomb


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, datasets):
    with hostile.hostile_cluster("flight", tmp_path_factory, datasets) as c:
        yield c


def test_a_flight_stranger_is_refused_before_anything_it_sends_is_read(attack):
    """Without the tenant's connector token in its headers, a call gets `error` and close 4001 at once; the
    96 MiB message it sent is never read (gRPC's receive limit would refuse it anyway: nothing is held)."""
    cluster, _ = attack
    rss_before = reset_peak_rss(cluster.gateway.pid)
    for headers in ((), flight_headers("tenant_001", "not-the-token"), flight_headers("nobody", "x")):
        stranger = RawConnector(cluster.ws_url, "flight", headers)
        stranger.send("x" * (96 << 20))
        refusal = stranger.recv()
        assert refusal["action"] == "error" and refusal["code"] == "unauthenticated", refusal
        assert stranger.closed() == (4001, "invalid token")
        stranger.close()
    assert peak_rss(cluster.gateway.pid) - rss_before < 48 << 20


def test_a_data_call_is_refused_for_a_stream_it_does_not_own(attack):
    """A data call names its session and stream: another tenant's session, a stream never opened, a second call for
    a stream that has one, a command that is not one — each is refused, and the real stream goes on."""
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    other = cluster.health()["tenants"]["tenant_002"]["session_id"]
    seen: dict = {}

    def respond(sid):
        for name, command in (("other tenant's session", flight_tunnel.data_command(other, 2)),
                              ("unopened stream", flight_tunnel.data_command(tunnel.session_id, sid + 1000)),
                              ("not a command", b"[1, 2]")):
            outbox, call = tunnel.data_call(-len(seen) - 1, command)
            outbox.put(END_OF_CALL)  # the gateway answers at once
            with pytest.raises(grpc.RpcError) as refused:
                list(call)
            seen[name] = refused.value.code()
        tunnel.send(frame(1, sid, STRINGS.serialize().to_pybytes()))
        outbox, call = tunnel.data_call(-99, flight_tunnel.data_command(tunnel.session_id, sid))
        outbox.put(END_OF_CALL)
        with pytest.raises(grpc.RpcError) as twice:
            list(call)
        seen["second call"] = twice.value.code()
        tunnel.send(frame(2, sid, strings_batch(10)))
        tunnel.send(frame(3, sid))

    outcome: dict = {}

    def client():
        with flight.connect(cluster.flight_uri) as c:
            options = bearer(cluster.tenants["tenant_001"].client_token, timeout=20)
            info = c.get_flight_info(sales(), options)
            outcome["table"] = c.do_get(info.endpoints[0].ticket, options).read_all()

    thread = threading.Thread(target=client)
    thread.start()
    tunnel.answer_flight_info(STRINGS)
    respond(tunnel.recv_until("do_get")["request_id"])
    thread.join(30)
    assert seen == {"other tenant's session": grpc.StatusCode.FAILED_PRECONDITION,
                    "unopened stream": grpc.StatusCode.FAILED_PRECONDITION,
                    "not a command": grpc.StatusCode.INVALID_ARGUMENT,
                    "second call": grpc.StatusCode.FAILED_PRECONDITION}, seen
    assert outcome["table"].num_rows == 10  # the stream itself was served


def test_arrow_data_sent_as_flight_data_is_refused_unread(attack):
    """The 128 MiB zstd bomb as Flight data (data_header and data_body, as a Flight writer sends a batch): a Flight
    reader would decompress it before anything checks it; the gateway refuses the message unread."""
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    rss_before = reset_peak_rss(cluster.gateway.pid)
    bomb = _bomb()
    meta_len = struct.unpack_from("<i", bomb, 4)[0]
    header, body = bomb[8:8 + meta_len], bomb[8 + meta_len:]
    as_flight_data = (b"\x12" + write_varint(len(header)) + header +
                      write_varint(1000 << 3 | 2) + write_varint(len(body)) + body)

    def respond(sid):
        tunnel.send(frame(1, sid, INTS.serialize().to_pybytes()))
        tunnel.send_on_data_call(sid, as_flight_data)

    outcome = attacker_reads(cluster, tunnel, INTS, respond)
    assert isinstance(outcome["error"], flight.FlightInternalError), outcome["error"]
    assert "only as app_metadata" in str(outcome["error"])
    assert tunnel.recv_until("cancel")["reason"]
    assert peak_rss(cluster.gateway.pid) - rss_before < 64 << 20


@pytest.mark.parametrize("message, code, reason", [
    (flight_tunnel.metadata_message(b"{not json"), 4000, "not valid JSON"),
    (flight_tunnel.metadata_message(b'{"action": "self_destruct"}'), 4000, "unknown action"),
    (flight_tunnel.metadata_message(b"\xff\xfe{}"), 4000, "not UTF-8"),
    (flight_tunnel.metadata_message(b'{"action": "heartbeat", "pad": "%s"}' % (b"x" * (80 << 10))), 1009,
     "exceeds the limit"),
    (b"\x12\x03abc", 4000, "only as app_metadata"),  # Arrow data on the control call
    (b"\x22\x01a", 4000, "not allowed"),  # a field FlightData does not have
], ids=["malformed-json", "unknown-action", "not-utf8", "oversized-text", "data-header", "unknown-field"])
def test_a_bad_control_message_ends_the_control_call_with_a_code_and_reason(attack, message, code, reason):
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    tunnel.send_on_control_call(message)
    closed = tunnel.closed()
    assert closed[0] == code and reason in closed[1], closed


def test_anything_before_register_is_refused_on_the_control_call(attack):
    cluster, connect = attack
    tunnel = connect()
    tunnel.send('{"action": "heartbeat"}')
    closed = tunnel.closed()
    assert closed[0] == 4000 and "before register" in closed[1], closed


def test_a_control_call_flood_is_closed_with_4005(attack):
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    for _ in range(200):
        tunnel.send('{"action": "heartbeat", "ts": 1.0}')
    assert tunnel.closed()[0] == 4005


def test_random_flight_data_on_the_control_call_leaves_the_gateway_serving(attack):
    """Every control call ends with a documented close code, or gRPC's refusal of what it cannot read; never
    an internal error or a traceback in the gateway's log."""
    import random

    cluster, connect = attack
    rng = random.Random(11)
    codes = []
    for _ in range(20):
        tunnel = registered(cluster, connect) if rng.random() < 0.8 else connect()
        for _ in range(rng.randint(1, 30)):
            tunnel.send_on_control_call(rng.choice([
                flight_tunnel.metadata_message(rng.randbytes(rng.randint(0, 40))),
                flight_tunnel.metadata_message(rng.randbytes(rng.randint(0, 40)).decode("latin-1").encode()),
                rng.randbytes(rng.randint(0, 30))]))
        codes.append(tunnel.closed()[0])
        tunnel.close()
    assert set(codes) <= {1000, 1006, 1009, 4000, 4005}, codes
    assert 4000 in codes
    log = cluster.gateway.log_tail(100_000)
    assert "Traceback" not in log and "never retrieved" not in log


def test_a_control_call_the_connector_keeps_open_after_close_is_ended_by_the_gateway(attack):
    """Replaced (4002) while it keeps its control call open and says nothing more: the gateway ends the call
    itself after `close`, so such calls cannot pile up against the port's call limit."""
    cluster, connect = attack
    first = registered(cluster, connect)
    second = registered(cluster, connect)  # the same empty connector_id: it replaces the first
    try:
        assert first.closed(timeout=10)[0] == 4002
    finally:
        second.close()


def test_a_tenant_holds_at_most_half_the_ports_calls_and_silent_calls_end(attack):
    """Calls that never send their first message: each ends after the register timeout, and one tenant holds at
    most half of the port's calls at once — the next is refused (RESOURCE_EXHAUSTED) — while others are served."""
    import queue

    from poc.tunnel.limits import MAX_STREAMS

    cluster, _ = attack
    share = (6 + 2 * MAX_STREAMS + 256) // 2  # --max-pending-tunnels 6 in this cluster (GATEWAY_ARGS)
    headers = flight_headers("tenant_001", cluster.tenants["tenant_001"].connector_token)
    held = queue.Queue()  # nothing is ever sent: the calls' request streams wait on it
    with grpc.insecure_channel(cluster.ws_url.split("://", 1)[1]) as channel:
        exchange = channel.stream_stream(f"/{flight_tunnel.SERVICE}/DoExchange")
        calls = [exchange(iter(held.get, END_OF_CALL), metadata=headers, timeout=30) for _ in range(share + 5)]
        codes = [call.code() for call in calls]
        for _ in calls:
            held.put(END_OF_CALL)
    refused = [c for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= 5 and "its share" in refused[0].details(), set(codes)
    silent = [c for c in calls if c.code() == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(silent) >= share - 5 and "no first message within 2 s" in silent[0].details(), set(codes)
