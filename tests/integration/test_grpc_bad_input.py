"""Hostile or broken input on the gRPC tunnel: the stream ends with a close code and reason in its trailers,
and the gateway serves on."""

from __future__ import annotations

import json
import random
import struct

import grpc
import pytest

from poc.workbook.servers.runner import Cluster
from poc.transports.grpc_tunnel import METHOD, decode, encode
from tests.helpers import read

LIMITS = ("--max-message-bytes", "4096", "--max-frame-bytes", str(256 << 10), "--window-bytes", str(512 << 10),
          "--max-unsolicited-per-s", "20")


@pytest.fixture
def gateway(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=LIMITS, with_direct=False,
                 with_connectors=False, tunnel="grpc") as c:
        c.start_connector("tenant_002")
        c.wait_online(["tenant_002"])
        yield c
        _, table = read(c.flight_uri, tenants["tenant_002"].client_token)
        assert table.num_rows == 20_000 and c.gateway.popen.poll() is None


def exchange(cluster: Cluster, messages: list[bytes]) -> tuple[list, dict]:
    """Send raw envelopes on one Connect stream; return the replies and the trailing metadata."""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.tunnel_port}") as channel:
        call = channel.stream_stream(METHOD)(iter(messages), timeout=20)
        replies = [decode(r) for r in call]
        return replies, dict(call.trailing_metadata() or ())


def register(tenants, token=None) -> bytes:
    return encode(json.dumps({"action": "register", "tenant_id": "tenant_001", "version": "1", "datasets": [],
                              "token": token or tenants["tenant_001"].connector_token}))


@pytest.mark.parametrize("message, code, reason", [
    (b"\x99garbage", "4000", "envelope"),
    (b"\x0a\x05ab", "4000", "envelope length"),
    (encode("{not json"), "4000", "not valid JSON"),
    (encode(json.dumps({"action": "self_destruct"})), "4000", "unknown action"),
    (encode(struct.pack("!B3xI", 2, 9) + b"x"), "4000", "never opened"),
    (encode(json.dumps({"action": "heartbeat", "pad": "x" * 5000})), "1009", "exceeds the limit"),
], ids=["not-an-envelope", "bad-length", "malformed-json", "unknown-action", "unknown-stream", "oversized-text"])
def test_bad_message_after_register_ends_the_stream_with_code_and_reason(gateway, tenants, message, code, reason):
    replies, trailers = exchange(gateway, [register(tenants), message])
    assert json.loads(replies[0])["action"] == "registered"
    assert trailers["tunnel-close-code"] == code and reason in trailers["tunnel-close-reason"]


def test_anything_before_register_is_refused(gateway):
    _, trailers = exchange(gateway, [encode(json.dumps({"action": "heartbeat"}))])
    assert trailers["tunnel-close-code"] == "4000" and "before register" in trailers["tunnel-close-reason"]


def test_wrong_token_is_refused_with_4001(gateway, tenants):
    replies, trailers = exchange(gateway, [register(tenants, token="forged-token")])
    assert json.loads(replies[0])["code"] == "unauthenticated"
    assert trailers["tunnel-close-code"] == "4001"


def test_a_flood_is_closed_with_4005(gateway, tenants):
    heartbeats = [encode(json.dumps({"action": "heartbeat", "ts": 1.0}))] * 200
    _, trailers = exchange(gateway, [register(tenants)] + heartbeats)
    assert trailers["tunnel-close-code"] == "4005"


def test_a_message_over_the_grpc_size_limit_fails_the_stream(gateway, tenants):
    with pytest.raises(grpc.RpcError) as info:
        exchange(gateway, [register(tenants), encode(b"\x02" + b"x" * (300 << 10))])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_random_envelopes_leave_the_gateway_serving(gateway, tenants):
    """Every stream ends with a documented close code in its trailers, or gRPC's own refusal of an envelope
    it cannot read; never an internal error or a traceback in the gateway's log."""
    rng = random.Random(11)
    codes = []
    for _ in range(40):
        batch = [register(tenants)] if rng.random() < 0.8 else []
        batch += [rng.choice([encode(rng.randbytes(rng.randint(0, 40))),
                              encode(rng.randbytes(rng.randint(0, 40)).decode("latin-1")),
                              rng.randbytes(rng.randint(0, 30))]) for _ in range(rng.randint(1, 50))]
        try:
            codes.append(exchange(gateway, batch)[1].get("tunnel-close-code", "none"))
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    assert set(codes) <= {"1000", "1001", "1009", "4000", "4001", "4005", "RESOURCE_EXHAUSTED"}, codes
    assert "4000" in codes
    log = gateway.gateway.log_tail(100_000)
    assert "Traceback" not in log and "never retrieved" not in log
