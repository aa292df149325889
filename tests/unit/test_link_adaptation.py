"""Protocol 1.4 in the core: codecs negotiated at registration, compressed batches charged by what they
decode to, pings that measure the link and windows that grow with it within their bounds. No sockets."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from poc.catalog import compress_message
from poc.tunnel import ConnectorEndpoint, FlowControlError, FrameType, GatewayEndpoint, Limits
from poc.tunnel import events as ev
from poc.tunnel import ipc
from poc.tunnel.frames import HEADER

MIB = 1024 * 1024
LIMITS = Limits(max_frame_bytes=4 * MIB, window_bytes=64 * MIB, initial_window_bytes=8 * MIB, max_streams=8,
                codecs=("zstd", "lz4"))
TABLE = pa.table({"id": pa.array(range(50_000), pa.int64()), "s": pa.array(["abc"] * 50_000)})


def pair(codecs: list[str] | None, limits: Limits = LIMITS) -> tuple[GatewayEndpoint, ConnectorEndpoint]:
    gateway, connector = GatewayEndpoint(limits), ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"], "c/0", codecs)
    [register] = connector.data_to_send()
    gateway.receive_text(register, now=0.0)
    gateway.accept("sess_1", heartbeat_s=60)
    [registered] = gateway.data_to_send()
    connector.receive_text(registered)
    return gateway, connector


def open_stream(gateway: GatewayEndpoint, connector: ConnectorEndpoint) -> int:
    sid = gateway.open_stream("sales")
    [do_get] = gateway.data_to_send()
    connector.receive_text(do_get)
    return sid


def to_gateway(gateway: GatewayEndpoint, connector: ConnectorEndpoint, now: float) -> list[ev.Event]:
    events = []
    for item in connector.data_to_send():
        events += (gateway.receive_text(item, now) if isinstance(item, str) else gateway.receive_binary(item, now))
    return events


# -- negotiation

def test_the_gateway_picks_its_best_codec_among_those_offered():
    gateway, connector = pair(["lz4", "zstd"])
    assert gateway.codec == connector.codec == "zstd" and gateway.pings


def test_a_connector_that_offers_no_codecs_gets_none_and_no_pings():
    """A 1.3 connector (no codecs field) and a 1.4 one with compression off: registered names no codec;
    only the 1.4 one is pinged."""
    for codecs, pinged in ((None, False), ([], True)):
        gateway, connector = pair(codecs)
        assert gateway.codec is None and connector.codec is None and gateway.pings is pinged
        sid = open_stream(gateway, connector)
        connector.send_frame(FrameType.SCHEMA, sid, TABLE.schema.serialize())
        to_gateway(gateway, connector, now=1.0)
        sent = [json.loads(t)["action"] for t in gateway.data_to_send()]
        assert ("ping" in sent) is pinged


def test_registered_without_codec_field_is_what_an_old_gateway_sends():
    gateway, connector = pair(["zstd"], Limits(max_frame_bytes=4 * MIB, window_bytes=8 * MIB))
    assert gateway.codec is None and connector.codec is None


def test_a_connector_refuses_a_codec_it_did_not_offer():
    from poc.tunnel import RemoteProtocolError

    connector = ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"], "c/0", ["lz4"])
    registered = json.dumps({"action": "registered", "status": "ok", "session_id": "s", "heartbeat_s": 60,
                             "max_frame_bytes": 1024, "window_bytes": 4096, "max_streams": 4, "codec": "zstd"})
    with pytest.raises(RemoteProtocolError, match="not offered"):
        connector.receive_text(registered)


# -- compressed batches

def test_a_compressed_batch_costs_what_it_decodes_to_and_decodes_exactly():
    gateway, connector = pair(["zstd"])
    sid = open_stream(gateway, connector)
    raw = TABLE.to_batches()[0].serialize()
    compressed = compress_message(raw, TABLE.schema, "zstd")
    charge = ipc.charge(memoryview(compressed), "zstd")
    assert compressed.size < raw.size / 2 and charge > raw.size - 1024  # small on the wire, charged full
    connector.send_frame(FrameType.SCHEMA, sid, TABLE.schema.serialize())
    connector.send_frame(FrameType.BATCH, sid, memoryview(compressed), charge=charge)
    assert connector.credit(sid) == 8 * MIB - TABLE.schema.serialize().size - charge
    events = to_gateway(gateway, connector, now=1.0)
    batch = next(e for e in events if isinstance(e, ev.BatchReceived))
    assert batch.charge == charge and gateway.streams[sid].credit == connector.credit(sid)
    decoded = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(batch.payload)), TABLE.schema)
    assert decoded.equals(TABLE.to_batches()[0])


def test_a_compressed_batch_is_refused_with_another_codec_or_none():
    raw = TABLE.to_batches()[0].serialize()
    for negotiated, sent in ((None, "zstd"), ("lz4", "zstd"), ("zstd", "lz4")):
        with pytest.raises(ipc.InvalidMessage):
            ipc.check_message(memoryview(compress_message(raw, TABLE.schema, sent)), ipc.RECORD_BATCH, negotiated)


def test_a_bomb_that_decodes_past_the_streams_credit_closes_the_link_4004():
    """128 MiB of zeros in a few KB: charged by the sizes it declares, before anything is decompressed."""
    gateway, connector = pair(["zstd"])
    sid = open_stream(gateway, connector)
    zeros = pa.record_batch({"x": pa.array([0] * (16 * MIB), pa.int64())})
    bomb = compress_message(zeros.serialize(), zeros.schema, "zstd")
    assert bomb.size < 64 * 1024
    gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, sid) + zeros.schema.serialize().to_pybytes(), now=0.0)
    with pytest.raises(FlowControlError):
        gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + bomb.to_pybytes(), now=0.0)


def test_a_compressed_batch_within_credit_but_past_a_frame_ends_only_its_stream():
    limits = Limits(max_frame_bytes=1 * MIB, window_bytes=64 * MIB, initial_window_bytes=64 * MIB, codecs=("zstd",))
    gateway, connector = pair(["zstd"], limits)
    sid = open_stream(gateway, connector)
    zeros = pa.record_batch({"x": pa.array([0] * (MIB // 2), pa.int64())})  # 4 MiB decoded
    gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, sid) + zeros.schema.serialize().to_pybytes(), now=0.0)
    payload = compress_message(zeros.serialize(), zeros.schema, "zstd").to_pybytes()
    [event] = gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + payload, now=0.0)
    assert isinstance(event, ev.StreamRejected) and "max_frame_bytes" in event.reason


# -- pings and windows

def test_a_pong_overtakes_the_connectors_queued_data():
    gateway, connector = pair(["zstd"])
    sid = open_stream(gateway, connector)
    framed = bytearray(HEADER.size + MIB)
    connector.send_frame(FrameType.SCHEMA, sid, TABLE.schema.serialize())
    for _ in range(6):
        connector.send_frame(FrameType.BATCH, sid, framed=framed)
    connector.receive_text('{"action": "ping", "seq": 7}')
    assert json.loads(connector.next_to_send()) == {"action": "pong", "seq": 7}


def stream_data(gateway: GatewayEndpoint, sid: int, size: int, now: float) -> None:
    """`size` bytes of batch frames for stream `sid` arriving at `now` (credit given back as they come)."""
    message = TABLE.slice(0, 1).to_batches()[0].serialize().to_pybytes()
    while size > 0:
        gateway.receive_binary(HEADER.pack(FrameType.BATCH, sid) + message, now=now)
        gateway.streams[sid].credit += len(message)  # as if the client had consumed and the grant been sent
        size -= len(message)


def measure(gateway: GatewayEndpoint, sid: int, rtt: float, per_rtt: int, start: float) -> float:
    """One ping's round: data starts it, `per_rtt` bytes arrive while it is out, its pong after `rtt`."""
    stream_data(gateway, sid, 1, start)
    pings = [json.loads(t) for t in gateway.data_to_send() if '"ping"' in t]
    assert pings, "data arriving with no ping out starts one"
    stream_data(gateway, sid, per_rtt, start + rtt / 2)
    gateway.receive_text(json.dumps({"action": "pong", "seq": pings[-1]["seq"]}), now=start + rtt)
    return start + rtt + gateway.PING_INTERVAL_S


def started_stream(limits: Limits = LIMITS) -> tuple[GatewayEndpoint, int]:
    gateway, connector = pair(["zstd"], limits)
    sid = open_stream(gateway, connector)
    gateway.receive_binary(HEADER.pack(FrameType.SCHEMA, sid) + TABLE.schema.serialize().to_pybytes())  # no clock:
    return gateway, sid  # no ping yet


def test_windows_grow_towards_twice_the_measured_bdp_and_never_past_window_bytes():
    """100 ms round trips carrying 10 MB each (100 MB/s): the target is 2 × 10 MB, and a stream's window
    grows to it through its grants; at 1 GB/s the target stops at window_bytes (64 MiB)."""
    gateway, sid = started_stream()
    t = measure(gateway, sid, rtt=0.1, per_rtt=10_000_000, start=1.0)
    assert gateway.rtt_s == pytest.approx(0.1)
    assert gateway.window_target == pytest.approx(2 * 10_000_000, rel=0.01)
    grow = gateway.growth(sid)
    assert grow == gateway.window_target - 8 * MIB
    gateway.grant_credit(sid, 1000, grow)
    [credit] = gateway.data_to_send()
    assert json.loads(credit)["bytes"] == 1000 + grow and gateway.streams[sid].window == gateway.window_target
    assert gateway.growth(sid) == 0
    measure(gateway, sid, rtt=0.1, per_rtt=100_000_000, start=t)
    assert gateway.window_target == 64 * MIB
    gateway.grant_credit(sid, 1, 10**12)  # asking for more than growth() allows gives what it allows
    assert gateway.streams[sid].window == 64 * MIB


def test_on_a_fast_short_link_windows_stay_at_their_initial_size():
    gateway, sid = started_stream()
    measure(gateway, sid, rtt=0.0002, per_rtt=200_000, start=1.0)  # 1 GB/s over 200 µs: a 200 KB BDP
    assert gateway.window_target == 8 * MIB and gateway.growth(sid) == 0


def test_the_fixed_policy_never_grows_and_never_pings():
    limits = Limits(max_frame_bytes=4 * MIB, window_bytes=64 * MIB, initial_window_bytes=8 * MIB, adaptive_window=False)
    gateway, sid = started_stream(limits)
    stream_data(gateway, sid, 4 * MIB, 1.0)
    assert not any('"ping"' in t for t in gateway.data_to_send()) and gateway.growth(sid) == 0


def test_a_pong_nobody_asked_for_counts_as_unsolicited():
    from poc.tunnel import RemoteProtocolError

    gateway, _ = started_stream()
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        for i in range(200):
            gateway.receive_text(json.dumps({"action": "pong", "seq": 999}), now=1.0)


# -- frames sized to the link (the connector)

def test_frames_shrink_to_what_a_slow_link_drains_in_20_ms_and_never_past_the_gateways_limit():
    from poc.connector import frame_budget

    assert frame_budget(None, 4 * MIB) == 4 * MIB  # rate unknown: the gateway's limit
    assert frame_budget(50e6 / 8, 4 * MIB) == 64 * 1024  # 50 Mbit/s: 125 KB in 20 ms → the floor, 64 KiB
    assert frame_budget(500e6 / 8, 4 * MIB) == MIB  # 500 Mbit/s: 1.25 MB → 1 MiB
    assert frame_budget(1e9, 4 * MIB) == 4 * MIB  # 1 GB/s: 20 MB, capped by max_frame_bytes
    assert frame_budget(1e9, 3 * MIB) == 2 * MIB  # a power of two that fits the limit
    assert frame_budget(1.0, 32 * 1024) == 32 * 1024  # never above the gateway's limit, even below the floor


def test_a_dataset_cut_for_a_slow_link_keeps_every_row_in_smaller_frames():
    from poc.catalog import Dataset, cut_batches

    table = pa.table({"id": pa.array(range(200_000), pa.int64()), "s": pa.array(["x" * 20] * 200_000)})
    ds = Dataset("t", table.schema, cut_batches(table))
    small = ds.framed_messages(64 * 1024)
    assert all(len(f) - HEADER.size <= 64 * 1024 for f in small) and len(small) > len(ds.framed_messages(4 * MIB))
    rows = sum(pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(bytes(f[HEADER.size:]))), table.schema)
               .num_rows for f in small)
    assert rows == table.num_rows


def test_batches_cut_small_for_a_slow_link_still_compress_within_the_gateways_frame_limit():
    """A compressed batch is charged its payload plus what it decodes to, so a batch cut to fit 64 KiB is often
    charged more than 64 KiB; it must still go compressed while the charge fits max_frame_bytes, or a slow link
    — where compression pays most — would get few compressed batches."""
    from poc.catalog import Dataset, cut_batches

    table = pa.table({"id": pa.array(range(200_000), pa.int64()), "s": pa.array(["abc"] * 200_000)})
    ds = Dataset("t", table.schema, cut_batches(table))
    count = len(ds.framed_messages(64 * 1024))
    within_cut = [ds.compressed_frame("zstd", 64 * 1024, i) for i in range(count)]
    within_frame = [ds.compressed_frame("zstd", 64 * 1024, i, charge_limit=4 * MIB) for i in range(count)]
    assert within_cut.count(None) > 0 and within_frame.count(None) == 0
    assert any(charge > 64 * 1024 for _, charge in within_frame) and all(c <= 4 * MIB for _, c in within_frame)
    assert ds.is_cut(64 * 1024) and ds.is_cut(64 * 1024, "zstd", 0, 4 * MIB) and not ds.is_cut(32 * 1024)


# -- what the bench and the report read of a connector's compression (poc.workbook.servers.runner)

def test_the_bench_counts_each_time_a_connector_turns_compression_on(tmp_path, caplog):
    """`--compression auto` turns compression on for a link it judges wide-area and slow; the bench reads the
    connector's log to say so, since on loopback the gateway's figures would then include decompression. The
    line counted is the one the session logs (a reworded log line would break the count here, not silently)."""
    import logging

    from poc.connector.config import ConnectorConfig
    from poc.connector.session import Session
    from poc.workbook.servers.runner import compressed_switches

    class Link:  # what a session reads of its transport for this decision
        def __init__(self, endpoint) -> None:
            self.endpoint, self.drain_bps = endpoint, 10e6  # 80 Mbit/s: under --compress-below-mbps

    _, connector = pair(["zstd"])
    cfg = ConnectorConfig(gateway="ws://127.0.0.1:1/connect", tenant_id="t1", token="secret-token")
    session = Session(cfg, serving=None, metrics=None, transport=Link(connector), hooks=None)
    session.rtt_s = 0.050  # heartbeats came back after 50 ms: a wide-area link
    with caplog.at_level(logging.INFO, logger="poc.connector"):
        assert session.compressing()
        session.transport.drain_bps = 1e9  # fast again: off (not counted) ...
        assert not session.compressing()
        session.transport.drain_bps = 10e6  # ... and on once more
        assert session.compressing()
    log = tmp_path / "connector.log"
    log.write_text("\n".join(record.getMessage() for record in caplog.records) + "\n")
    assert compressed_switches(log) == 2
    assert compressed_switches(tmp_path / "absent.log") == 0


def test_the_report_says_which_tenants_compressed_and_that_their_spread_is_not_comparable():
    from poc.workbook.report.build import compression_note

    assert compression_note({}) == ""  # nothing compressed: nothing to say
    note = compression_note({"tenant_005": 11, "tenant_002": 1})
    assert "tenant_002 (1×), tenant_005 (11×)" in note and "not comparable" in note
