"""Hostile or broken input on the tunnel: a clean close with a code and a reason, and the gateway serves on."""

from __future__ import annotations

import json
import random
import struct
import threading

import pyarrow.flight as flight
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, read, sales

LIMITS = ("--max-message-bytes", "4096", "--max-frame-bytes", str(256 << 10), "--window-bytes", str(512 << 10),
          "--max-unsolicited-per-s", "20")


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack("!B3xI", kind, stream_id) + payload


@pytest.fixture
def gateway(tmp_path, tenants, datasets):
    """A gateway with small limits; tenant_002 has a real connector, tenant_001 is left to the raw client."""
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=LIMITS, with_direct=False,
                 with_connectors=False) as c:
        c.start_connector("tenant_002")
        c.wait_online(["tenant_002"])
        yield c
        # whatever happened above, the gateway still serves a normal request
        _, table = read(c.flight_uri, tenants["tenant_002"].client_token)
        assert table.num_rows == 20_000
        assert c.gateway.popen.poll() is None


def raw(cluster: Cluster, tenants, register: bool = True):
    ws = connect(cluster.websocket_url, compression=None, max_size=None, open_timeout=10)
    if register:
        ws.send(json.dumps({"action": "register", "tenant_id": "tenant_001",
                            "token": tenants["tenant_001"].connector_token, "version": "1", "datasets": ["sales"]}))
        assert json.loads(ws.recv(10))["action"] == "registered"
    return ws


def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(10)
    return ws.close_code, ws.close_reason


BAD_AFTER_REGISTER = {  # what a registered connector sends: the close code and a part of the reason it gets
    "malformed-json": ("{not json", 4000, "not valid JSON"),
    "unknown-action": (json.dumps({"action": "self_destruct"}), 4000, "unknown action"),
    "missing-field": (json.dumps({"action": "flight_info", "request_id": 1}), 4000, "missing field"),
    "wrong-type": (json.dumps({"action": "heartbeat", "ts": "yesterday"}), 4000, "must be float"),
    "second-register": (json.dumps({"action": "register", "tenant_id": "x", "token": "y", "version": "1",
                                    "datasets": []}), 4000, "unexpected 'register'"),
    "oversized-text": (json.dumps({"action": "heartbeat", "pad": "x" * 5000}), 1009, "exceeds the limit"),
    "unknown-stream": (frame(2, 99, b"data"), 4000, "never opened"),
    "unknown-frame-type": (frame(7, 1, b"data"), 4000, "unknown binary frame type"),
    "short-frame": (b"\x01\x00", 4000, "shorter than its header"),
    "unrequested-reply": (json.dumps({"action": "flight_info", "request_id": 5, "schema": "", "rows": 1,
                                      "bytes": 1}), 4000, "did not send"),
}


def test_bad_message_after_register_closes_with_code_and_reason(gateway, tenants):
    """Each bad message on a link of its own (one gateway for all: the fixture checks it serves on after them)."""
    got = {}
    for case, (message, _, _) in BAD_AFTER_REGISTER.items():
        ws = raw(gateway, tenants)
        ws.send(message)
        got[case] = closed_with(ws)
    wrong = {case: got[case] for case, (_, code, reason) in BAD_AFTER_REGISTER.items()
             if got[case][0] != code or reason not in got[case][1]}
    assert not wrong, wrong


def test_oversized_binary_frame_is_refused(gateway, tenants):
    ws = raw(gateway, tenants)
    ws.send(frame(2, 1, b"x" * (300 << 10)))
    assert closed_with(ws)[0] == 1009


def test_anything_before_register_is_refused(gateway, tenants):
    got = {}
    for case, first in {"heartbeat": json.dumps({"action": "heartbeat"}), "binary": frame(1, 1, b"schema"),
                        "not-an-object": "[]"}.items():
        ws = raw(gateway, tenants, register=False)
        ws.send(first)
        got[case] = closed_with(ws)
    assert all(code == 4000 and reason for code, reason in got.values()), got


def test_wrong_connector_token_is_closed_with_4001(gateway):
    ws = connect(gateway.websocket_url, compression=None)
    ws.send(json.dumps({"action": "register", "tenant_id": "tenant_001", "token": "forged-token",
                        "version": "1", "datasets": []}))
    reply = json.loads(ws.recv(10))
    assert reply["code"] == "unauthenticated" and "forged-token" not in json.dumps(reply)
    assert closed_with(ws) == (4001, "invalid token for tenant 'tenant_001'")


def test_unsupported_version_is_refused(gateway, tenants):
    ws = connect(gateway.websocket_url, compression=None)
    ws.send(json.dumps({"action": "register", "tenant_id": "tenant_001",
                        "token": tenants["tenant_001"].connector_token, "version": "2.0", "datasets": []}))
    assert json.loads(ws.recv(10))["code"] == "unsupported_version"
    assert closed_with(ws)[0] == 4000


def test_a_flood_of_messages_is_closed_with_4005(gateway, tenants):
    ws = raw(gateway, tenants)
    for _ in range(200):
        try:
            ws.send(json.dumps({"action": "heartbeat", "ts": 1.0}))
        except ConnectionClosed:
            break
    code, reason = closed_with(ws)
    assert code == 4005 and "too many unsolicited messages" in reason


def serve_one_do_get(gateway, tenants, respond, read=lambda reader: reader.read_all(), join: bool = True):
    """Register a raw connector for tenant_001, start a client DoGet, and let `respond(ws, stream_id)` answer.
    The client reads the stream with `read`; without `join` the client's thread is left running
    (`outcome["thread"]`)."""
    ws = raw(gateway, tenants)
    outcome = {}

    def client():
        try:
            with flight.connect(gateway.flight_uri) as c:
                options = bearer(tenants["tenant_001"].client_token, timeout=20)
                info_thread_result.append(c.get_flight_info(sales(), options))
                outcome["table"] = read(c.do_get(info_thread_result[0].endpoints[0].ticket, options))
        except Exception as exc:  # the assertion is on what the client saw
            outcome["error"] = exc

    info_thread_result: list = []
    thread = threading.Thread(target=client)
    thread.start()
    request = json.loads(ws.recv(10))
    assert request["action"] == "get_flight_info"
    import base64

    from poc.workbook.dataset import SCHEMA
    ws.send(json.dumps({"action": "flight_info", "request_id": request["request_id"],
                        "schema": base64.b64encode(SCHEMA.serialize().to_pybytes()).decode(), "rows": 10,
                        "bytes": 100}))
    do_get = json.loads(ws.recv(10))
    assert do_get["action"] == "do_get"
    respond(ws, do_get["request_id"])
    outcome["thread"] = thread
    if join:
        thread.join(30)
    return ws, outcome


def test_invalid_arrow_ipc_fails_the_client_not_the_gateway(gateway, tenants):
    from poc.workbook.dataset import SCHEMA

    def respond(ws, sid):
        ws.send(frame(1, sid, SCHEMA.serialize().to_pybytes()))
        ws.send(frame(2, sid, b"\xff\xff\xff\xff" + b"garbage" * 20))

    ws, outcome = serve_one_do_get(gateway, tenants, respond)
    assert "table" not in outcome
    assert isinstance(outcome["error"], flight.FlightError) and "invalid Arrow IPC" in str(outcome["error"])
    while (message := json.loads(ws.recv(10)))["action"] != "cancel":  # perhaps a credit for the schema first
        assert message["action"] == "credit"
    assert "invalid Arrow IPC" in message["reason"]  # the gateway stops the broken stream
    ws.close()


def test_sending_beyond_credit_closes_the_link_and_fails_the_client(gateway, tenants):
    from poc.workbook.dataset import SCHEMA, make_table

    batch = make_table(4000).to_batches()[0].serialize().to_pybytes()  # ~200 KB, window is 512 KiB

    def respond(ws, sid):  # 8 MB in one burst: far more than the window plus anything granted meanwhile
        burst = [frame(1, sid, SCHEMA.serialize().to_pybytes())] + [frame(2, sid, batch)] * 40
        try:
            for data in burst:
                ws.send(data)
        except ConnectionClosed:
            pass

    def read(reader):  # one batch, then nothing until the link is gone: no grant can keep up with the burst
        reader.read_chunk()
        closed.wait(30)
        return reader.read_all()

    closed = threading.Event()
    ws, outcome = serve_one_do_get(gateway, tenants, respond, read, join=False)
    code, reason = closed_with(ws)
    closed.set()
    outcome["thread"].join(30)
    assert code == 4004 and "credit" in reason
    assert isinstance(outcome.get("error"), flight.FlightUnavailableError)


DOCUMENTED_CLOSES = {1000, 1001, 1009, 4000, 4001, 4004, 4005}  # docs/protocol.md §8


def test_thousands_of_random_frames_leave_the_gateway_serving(gateway, tenants):
    """Each connection the gateway closes gets a documented code with a reason; none ends in an internal
    error (1011), a dropped socket (1006) or a traceback in the gateway's log."""
    rng = random.Random(20261128)
    sent = 0
    closes: list[tuple[int, str]] = []
    while sent < 3000:
        ws = raw(gateway, tenants, register=rng.random() < 0.8)
        try:
            for _ in range(rng.randint(1, 400)):
                if rng.random() < 0.5:
                    kind = rng.choice([1, 2, 3, rng.randint(0, 255)])
                    data = frame(kind, rng.choice([1, 2, rng.randint(0, 2**32 - 1)]),
                                 rng.randbytes(rng.randint(0, 64)))
                    ws.send(data if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 12)))
                else:
                    choices = ['{"action":"heartbeat"}', '{"action":"credit","request_id":1,"bytes":-5}',
                               '{"action":"error","request_id":3,"code":"x","message":"y"}',
                               json.dumps({"action": rng.choice(["do_get", "cancel", "flight_info", "?"]),
                                           "request_id": rng.randint(-5, 5)}),
                               rng.randbytes(rng.randint(0, 40)).decode("latin-1")]
                    ws.send(rng.choice(choices))
                sent += 1
        except ConnectionClosed:
            closes.append(closed_with(ws))
        finally:
            ws.close()
    assert len(closes) > 5
    assert {code for code, _ in closes} <= DOCUMENTED_CLOSES, closes
    assert all(reason for _, reason in closes)
    log = gateway.gateway.log_tail(100_000)
    assert "Traceback" not in log and "never retrieved" not in log
