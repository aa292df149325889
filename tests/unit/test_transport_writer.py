"""The writer every transport shares, the order the core gives it, and the unsent bound of a connector's socket."""

from __future__ import annotations

import asyncio
import socket

from poc.config import BATCH_BYTES
from poc.transports.base import MAX_UNSENT_LOWAT, UNSENT_LOWAT, Link, unsent_budget
from poc.tunnel import ConnectorEndpoint, FrameType, GatewayEndpoint, Limits
from poc.tunnel.endpoint import QUANTUM
from poc.tunnel.frames import HEADER

MIB = 1024 * 1024
LIMITS = Limits(max_frame_bytes=2 * MIB, window_bytes=64 * MIB, initial_window_bytes=64 * MIB, max_streams=8)


class SlowLink(Link):
    """Each message takes a moment to leave, like a write waiting on the socket."""

    def __init__(self, endpoint=None) -> None:
        self._init_link(endpoint or ConnectorEndpoint())
        self.sent: list = []

    async def _transmit(self, item) -> None:
        self.sent.append(item if isinstance(item, str) else bytes(item))  # taken before the first wait
        await asyncio.sleep(0.002)


def streaming_connector(streams: int) -> ConnectorEndpoint:
    """A registered connector with `streams` open streams of 64 MiB credit each."""
    gateway, connector = GatewayEndpoint(LIMITS), ConnectorEndpoint()
    connector.register("t1", "secret-token", ["sales"])
    gateway.receive_text(connector.data_to_send()[0])
    gateway.accept("sess_1", heartbeat_s=60)
    for _ in range(streams):
        gateway.open_stream("sales")
    for text in gateway.data_to_send():
        connector.receive_text(text)
    return connector


def stream_of(item) -> int | None:
    return None if isinstance(item, str) else HEADER.unpack_from(item)[1]


def test_a_cancelled_caller_still_sends_what_others_queued():
    """A connector cancels a stream's task while it waits in `call`: the replies other tasks queued meanwhile
    must still leave, or their requests hang."""
    async def main():
        link = SlowLink()
        endpoint = link.endpoint
        caller = asyncio.get_running_loop().create_task(
            link.call(lambda: [endpoint._queue_control(t) for t in ("a", "b", "c")]))
        await asyncio.sleep(0.001)  # "a" is being written
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            pass
        while link._writer is not None:
            await asyncio.sleep(0.001)
        return link.sent, caller.cancelled()

    sent, cancelled = asyncio.run(main())
    assert sent == ["a", "b", "c"] and cancelled


def test_a_control_message_overtakes_a_full_data_queue():
    """A flight_info reply queued while twenty 2 MiB frames wait leaves right after the frame being written,
    not behind the other nineteen (docs/protocol.md §5a)."""
    async def main():
        link = SlowLink(streaming_connector(1))
        endpoint = link.endpoint
        framed = bytearray(HEADER.size + 2 * MIB)
        for i in range(20):
            endpoint.send_frame(FrameType.SCHEMA if i == 0 else FrameType.BATCH, 1, framed=framed)
        link.flush_soon()
        await asyncio.sleep(0.001)  # the first frame is on its way
        assert len(link.sent) == 1
        await link.call(endpoint.reply_flight_info, 2, b"schema", 10, 100)
        while link._writer is not None:
            await asyncio.sleep(0.001)
        return link.sent

    sent = asyncio.run(main())
    assert len(sent) == 21
    assert isinstance(sent[1], str) and '"flight_info"' in sent[1]  # second, ahead of nineteen frames
    assert all(stream_of(item) == 1 for item in sent[:1] + sent[2:])


def test_concurrent_streams_interleave_by_bytes():
    """Stream 1 queues 2 MiB frames, stream 2 frames of 256 KiB, stream 3 one of 64 KiB at the end: at every
    point of the sending order the first two have sent about the same bytes (within one frame and a
    quantum), and stream 3 does not wait for the others to finish."""
    endpoint = streaming_connector(3)
    big, small = bytearray(HEADER.size + 2 * MIB), bytearray(HEADER.size + MIB // 4)
    endpoint.send_frame(FrameType.SCHEMA, 1, framed=big)
    endpoint.send_frame(FrameType.SCHEMA, 2, framed=small)
    for _ in range(7):
        endpoint.send_frame(FrameType.BATCH, 1, framed=big)
    for _ in range(63):
        endpoint.send_frame(FrameType.BATCH, 2, framed=small)
    endpoint.send_frame(FrameType.SCHEMA, 3, payload=b"x" * (64 * 1024))
    sent = {1: 0, 2: 0, 3: 0}
    order = []
    while (item := endpoint.next_to_send()) is not None:
        sid = stream_of(item)
        order.append(sid)
        sent[sid] += len(item) - HEADER.size
        if sent[1] < 16 * MIB and sent[2] < 16 * MIB:
            assert abs(sent[1] - sent[2]) <= 2 * MIB + QUANTUM, sent
    assert sent == {1: 16 * MIB, 2: 16 * MIB, 3: 64 * 1024}
    assert order.index(3) < 10  # its first turn came within the first round
    assert [stream_of(f) for f in endpoint.data_to_send()] == []


def test_a_shared_frame_buffer_gets_each_streams_header_as_it_leaves():
    """Two streams queue the same buffer: each copy that leaves carries its own stream id."""
    endpoint = streaming_connector(2)
    framed = bytearray(HEADER.size + 100)
    endpoint.send_frame(FrameType.SCHEMA, 1, framed=framed)
    endpoint.send_frame(FrameType.SCHEMA, 2, framed=framed)
    assert [stream_of(f) for f in endpoint.data_to_send()] == [1, 2]


def test_a_failed_or_cancelled_streams_queued_frames_are_never_sent():
    """The error overtakes its stream's frames, so they are dropped rather than sent after it; a cancel
    drops them too."""
    endpoint = streaming_connector(2)
    framed = bytearray(HEADER.size + 100)
    for sid in (1, 2):
        endpoint.send_frame(FrameType.SCHEMA, sid, framed=framed)
        endpoint.send_frame(FrameType.BATCH, sid, framed=framed)
    endpoint.fail_request(1, "internal", "disk gone")
    endpoint.receive_text('{"action": "cancel", "request_id": 2, "reason": "client left"}')
    out = endpoint.data_to_send()
    assert len(out) == 1 and '"error"' in out[0] and not endpoint.has_data_to_send


def _tcp_pair():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, accepted


def test_a_near_sockets_receive_queue_is_bounded_and_a_far_ones_left_to_the_kernel():
    """bound_receive_queue sets SO_RCVBUF (which Linux doubles, within net.core.rmem_max) only on a socket
    whose measured round trip is under NEAR_RTT_US; a far link, size 0, and a socket without TCP are left
    alone (their autotuned buffer is not locked)."""
    import socket
    from pathlib import Path

    from poc.transports.base import NEAR_RTT_US, bound_receive_queue, tcp_min_rtt_us

    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    client, accepted = _tcp_pair()
    near, far, unset = _tcp_pair(), _tcp_pair(), _tcp_pair()
    try:
        accepted.sendall(b"x")
        client.recv(1)
        assert 0 <= tcp_min_rtt_us(accepted) < NEAR_RTT_US  # loopback
        before = {s: s[1].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in (near, far, unset)}
        assert bound_receive_queue(near[1], 300_000) is True
        assert near[1].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * min(300_000, rmem_max)
        assert bound_receive_queue(far[1], 300_000, min_rtt_us=lambda _: 20 * NEAR_RTT_US) is False
        assert bound_receive_queue(unset[1], 0) is False
        assert bound_receive_queue(None, 300_000) is False
        for pair in (far, unset):
            assert pair[1].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before[pair]
        a, b = socket.socketpair()
        assert bound_receive_queue(a, 300_000) is False  # not TCP: no round trip to measure
        a.close()
        b.close()
    finally:
        for s in (client, accepted, *near, *far, *unset):
            s.close()


class SocketLink(SlowLink):
    """A link over a real loopback TCP socket, to read back what it sets on it."""

    def __init__(self, sock) -> None:
        super().__init__()
        self.sock = sock

    def socket(self):
        return self.sock


def test_a_connectors_unsent_bound_follows_what_its_link_drains_in_20_ms():
    """128 KiB while the rate is unknown (a control message overtakes data on any link); on a fast link it
    grows to 3 MiB, since a wake-up per 128 KiB cost the connector 2.8 × the direct server's CPU per GB, and
    a bound under a whole frame has picows copy the rest of each frame (docs/results.md)."""
    assert MAX_UNSENT_LOWAT > BATCH_BYTES  # a default batch's frame goes to the kernel whole on a fast link
    assert unsent_budget(None) == UNSENT_LOWAT
    assert unsent_budget(50e6 / 8) == UNSENT_LOWAT  # 50 Mbit/s drains 125 KB in 20 ms
    assert unsent_budget(400e6 / 8) == 1_000_000  # 400 Mbit/s: 1 MB in 20 ms
    assert unsent_budget(1e9) == MAX_UNSENT_LOWAT
    listener = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    try:
        link = SocketLink(sock)
        option = socket.TCP_NOTSENT_LOWAT
        link.bound_unsent()
        assert sock.getsockopt(socket.IPPROTO_TCP, option) == UNSENT_LOWAT
        link._measure_drain(500 * MIB, 0.6)  # the link took 500 MiB in 0.6 s while more waited
        assert link.unsent_bound == MAX_UNSENT_LOWAT
        assert sock.getsockopt(socket.IPPROTO_TCP, option) == MAX_UNSENT_LOWAT
        for _ in range(6):  # then it slows down: the mean rate falls, and so does the bound
            link._measure_drain(3 * MIB, 0.6)
        assert sock.getsockopt(socket.IPPROTO_TCP, option) == unsent_budget(link.drain_bps) < MAX_UNSENT_LOWAT
    finally:
        for s in (sock, peer, listener):
            s.close()
