"""A hostile tenant against the gateway, on every tunnel transport.

tenant_001 is the attacker: a connector written from docs/protocol.md with raw bytes (tests/hostile.py).
tenant_002 is honest: a real connector whose client reads its table while each attack runs. Every case
checks that the gateway stays up, that the honest tenant's concurrent streams complete with exactly its
own table, and that the attacker's client gets an error, never a table.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, peak_rss, read, reset_peak_rss, sales
from tests.hostile import (INTS, ROWS, STRINGS, RawConnector, compressed_zeros, dictionary_messages, flight_headers,
                           frame, strings_batch, with_length, with_offset)

GATEWAY_ARGS = ("--max-message-bytes", str(64 << 10), "--max-frame-bytes", str(1 << 20),
                "--window-bytes", str(2 << 20), "--register-timeout-s", "2", "--request-timeout-s", "3",
                "--max-pending-tunnels", "6")
TRANSPORTS = ["picows", "websockets", "flight"]


@contextlib.contextmanager
def hostile_cluster(transport: str, tmp_path_factory, datasets):
    """A gateway on `transport`, with tenant_002's honest connector (data 'b'); tenant_001 is left to attackers."""
    from poc.config import make_tenants

    tenants = make_tenants(2)
    ws_args = () if transport == "flight" else ("--ws-impl", transport)
    with Cluster(tmp_path_factory.mktemp(f"hostile-{transport}"), tenants, datasets["b"],
                 gateway_args=GATEWAY_ARGS + ws_args, with_direct=False, with_connectors=False,
                 tunnel="flight" if transport == "flight" else "websocket", connector_args=ws_args) as c:
        c.start_connector("tenant_002")
        c.wait_online(["tenant_002"])
        c.transport = transport
        c.expected = pq.read_table(datasets["b"] / "sales.parquet")
        yield c


@pytest.fixture(scope="module", params=TRANSPORTS)
def cluster(request, tmp_path_factory, datasets):
    """One gateway per transport (`hostile_cluster`); the Flight tunnel's own attacks: test_flight_hostile.py."""
    with hostile_cluster(request.param, tmp_path_factory, datasets) as c:
        yield c


class Honest:
    """tenant_002's client reading its table over and over while an attack runs, each read's times kept."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tables: list[pa.Table] = []
        self.errors: list[Exception] = []
        self.reads: list[tuple[float, float]] = []  # (start, end) of each read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        token = self.cluster.tenants["tenant_002"].client_token
        while not self._stop.is_set() or not self.tables:
            started = time.monotonic()
            try:
                self.tables.append(read(self.cluster.flight_uri, token)[1])
            except Exception as exc:  # the assertion is on what the client saw
                self.errors.append(exc)
            self.reads.append((started, time.monotonic()))
            if len(self.reads) >= 500:  # bounded, whatever happens
                break

    def overlapped(self, start: float, end: float) -> bool:
        """Whether a read was in progress at some time between `start` and `end`."""
        return any(s < end and e > start for s, e in self.reads)

    def __enter__(self) -> "Honest":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture
def attack(cluster):
    """Yields (cluster, connect) where connect() opens a raw tunnel; afterwards checks the gateway serves
    the honest tenant exactly, during the attack and after it, and is still the same process."""
    tunnels: list[RawConnector] = []
    began: list[float] = []

    def connect() -> RawConnector:
        began.append(time.monotonic())
        # over Flight the attacker holds tenant_001's token: what it can do past the headers' check
        headers = flight_headers("tenant_001", cluster.tenants["tenant_001"].connector_token)
        tunnels.append(RawConnector(cluster.ws_url, "flight" if cluster.transport == "flight" else "websocket", headers))
        return tunnels[-1]

    with Honest(cluster) as honest:
        yield cluster, connect
        ended = time.monotonic()
    for tunnel in tunnels:
        tunnel.close()
    assert cluster.gateway.popen.poll() is None, "the gateway process died"
    assert honest.errors == [] and honest.tables, f"the honest tenant saw errors: {honest.errors[:3]}"
    assert honest.overlapped(began[0] if began else ended, ended), "no honest read ran during the attack"
    assert all(t.equals(cluster.expected) for t in honest.tables), "the honest tenant got a wrong table"
    _, table = read(cluster.flight_uri, cluster.tenants["tenant_002"].client_token)
    assert table.equals(cluster.expected)


def registered(cluster, connect) -> RawConnector:
    tunnel = connect()
    reply = tunnel.register("tenant_001", cluster.tenants["tenant_001"].connector_token)
    assert reply["action"] == "registered"
    return tunnel


def attacker_reads(cluster, tunnel: RawConnector, schema: pa.Schema, respond, timeout: float = 20) -> dict:
    """tenant_001's client does GetFlightInfo + DoGet; `respond(stream_id)` answers the do_get."""
    outcome: dict = {}

    def client():
        try:
            with flight.connect(cluster.flight_uri) as c:
                options = bearer(cluster.tenants["tenant_001"].client_token, timeout=timeout)
                info = c.get_flight_info(sales(), options)
                outcome["table"] = c.do_get(info.endpoints[0].ticket, options).read_all()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    tunnel.answer_flight_info(schema)
    respond(tunnel.recv_until("do_get")["request_id"])
    thread.join(timeout + 10)
    assert "table" not in outcome, f"the attacker's client got a table: {outcome['table'].schema}"
    return outcome


def _bomb() -> bytes:
    if not hasattr(_bomb, "cached"):
        _bomb.cached = compressed_zeros(128)
    return _bomb.cached


BAD_STREAMS = {  # schema announced, then the batch payloads sent after it
    "length-2^31-over-4951-rows": (STRINGS, lambda: [with_length(strings_batch(), ROWS, 2**31 - 1)]),
    "row-count-ten-times-the-data": (STRINGS, lambda: [with_length(strings_batch(), ROWS, ROWS * 10)]),
    "int32-data-announced-as-int64": (INTS, lambda: [pa.record_batch(
        [pa.array(range(ROWS), pa.int32())], names=["id"]).serialize().to_pybytes()]),
    "strings-announced-as-int64": (INTS, lambda: [strings_batch()]),
    "last-offset-past-the-data": (STRINGS, lambda: [with_offset(strings_batch(), ROWS, 10**6)]),
    "middle-offset-past-the-data": (STRINGS, lambda: [with_offset(strings_batch(), ROWS // 2, 10**6)]),
    "zstd-bomb-128-MiB": (INTS, lambda: [_bomb()]),
    "dictionary-batch": (STRINGS, lambda: dictionary_messages()[1:]),
    "garbage": (STRINGS, lambda: [b"\xff\xff\xff\xff" + b"garbage!" * 64]),
    "a-good-batch-then-a-bad-one": (STRINGS, lambda: [strings_batch(10), with_offset(strings_batch(), 3, -5)]),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_a_bad_batch_fails_only_its_own_stream(attack, case):
    cluster, connect = attack
    schema, payloads = BAD_STREAMS[case]
    tunnel = registered(cluster, connect)
    rss_before = reset_peak_rss(cluster.gateway.pid)

    def respond(sid):
        tunnel.send(frame(1, sid, schema.serialize().to_pybytes()))
        for payload in payloads():
            tunnel.send(frame(2, sid, payload))  # no END: the gateway must stop the stream itself

    outcome = attacker_reads(cluster, tunnel, schema, respond)
    assert isinstance(outcome["error"], flight.FlightInternalError), outcome["error"]
    assert "invalid Arrow IPC" in str(outcome["error"]) and "Traceback" not in str(outcome["error"])
    assert tunnel.recv_until("cancel")["reason"]  # the connector is told to stop that stream
    assert peak_rss(cluster.gateway.pid) - rss_before < 64 << 20  # at its worst during the attack
    # the attacker's link is still up: its next request arrives
    threading.Thread(target=lambda: _quietly(lambda: read(cluster.flight_uri,
                                                          cluster.tenants["tenant_001"].client_token)),
                     daemon=True).start()
    assert tunnel.recv_until("get_flight_info")["dataset"] == "sales"


def _quietly(call) -> None:
    try:
        call()
    except flight.FlightError:
        pass


@pytest.mark.parametrize("schema_payload", [
    lambda: dictionary_messages()[0],
    lambda: strings_batch(3),
    lambda: b"\xff\xff\xff\xff\x08\x00\x00\x00" + b"\x00" * 8,
], ids=["dictionary-field", "batch-as-schema", "garbage"])
def test_a_bad_schema_fails_only_its_own_stream(attack, schema_payload):
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    outcome = attacker_reads(cluster, tunnel, STRINGS,
                             lambda sid: tunnel.send(frame(1, sid, schema_payload())))
    assert isinstance(outcome["error"], flight.FlightInternalError), outcome["error"]


def test_a_huge_error_text_reaches_the_client_cut(attack):
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    outcome = attacker_reads(cluster, tunnel, STRINGS, lambda sid: tunnel.send(json.dumps(
        {"action": "error", "request_id": sid, "code": "internal", "message": "x" * 50_000})))
    text = str(outcome["error"])
    assert isinstance(outcome["error"], flight.FlightServerError) and "received metadata size exceeds" not in text
    assert "x" * 1000 in text and "x" * 1100 not in text  # cut to MAX_TEXT_CHARS (1024)


def test_a_late_answer_is_ignored_and_the_link_stays(attack):
    cluster, connect = attack
    tunnel = registered(cluster, connect)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        error=_error_of(lambda: read(cluster.flight_uri, cluster.tenants["tenant_001"].client_token))))
    thread.start()
    request = tunnel.recv_until("get_flight_info")
    thread.join(15)  # the gateway's request timeout (3 s) passes
    assert isinstance(outcome["error"], flight.FlightTimedOutError)
    tunnel.send(json.dumps({"action": "flight_info", "request_id": request["request_id"], "schema": "", "rows": 1,
                            "bytes": 1}))
    threading.Thread(target=lambda: _quietly(lambda: read(cluster.flight_uri,
                                                          cluster.tenants["tenant_001"].client_token)),
                     daemon=True).start()
    assert tunnel.recv_until("get_flight_info")["request_id"] > request["request_id"]


def _error_of(call):
    try:
        call()
    except Exception as exc:
        return exc
    return None


@pytest.mark.parametrize("message, code, reason", [
    ('{"action":"register","tenant_id":"tenant_001","token":"\\ud800","version":"1","datasets":[]}', 4000,
     "valid Unicode"),
    ("[" * 60_000, 4000, "nested too deeply"),
    ('{"action":"register","tenant_id":"tenant_001","token":"x","version":"1","datasets":["../../etc"]}', 4000,
     "not a dataset name"),
], ids=["surrogate-token", "deep-nesting", "bad-dataset-name"])
def test_a_hostile_register_is_closed_with_a_code(attack, message, code, reason):
    """Closed for what it sent, with that rule as the reason: not by the register timeout, whose close has the
    same code (so the code alone could not tell)."""
    cluster, connect = attack
    tunnel = connect()
    tunnel.send(message)
    assert tunnel.closed() == (code, tunnel.close_reason) and reason in tunnel.close_reason, \
        (tunnel.close_code, tunnel.close_reason)
    assert "no register within" not in tunnel.close_reason


def test_a_tunnel_that_never_registers_is_closed(attack):
    cluster, connect = attack
    tunnel = connect()
    code, reason = tunnel.closed(timeout=10)
    assert code == 4000 and "no register within 2 s" in reason


def test_tunnels_that_do_not_register_are_held_to_the_cap_and_the_next_is_closed_with_1013(attack):
    """Strangers holding unregistered tunnels: six are held (each until the register timeout), the seventh is
    closed at once with 1013 and the cap as its reason; once they are gone, a connector registers."""
    cluster, connect = attack
    held = [connect() for _ in range(6)]
    time.sleep(0.3)
    extra = connect()
    code, reason = extra.closed(timeout=5)
    assert code == 1013 and "6 tunnels are waiting to register" in reason, (code, reason)
    for tunnel in held:
        tunnel.close()
    time.sleep(0.5)
    assert registered(cluster, connect).close_code is None


def test_an_oversized_message_before_register_is_refused(attack):
    """96 MiB of one text message from a tunnel that never registered: WebSocket fragments are counted
    as they arrive (close 1009); the Flight tunnel's gRPC refuses the FlightData over its receive limit. Neither holds it."""
    cluster, connect = attack
    rss_before = reset_peak_rss(cluster.gateway.pid)
    tunnel = connect()
    if cluster.transport == "flight":
        tunnel.send("x" * (96 << 20))
        code, reason = tunnel.closed()
        assert code == 1006 and "RESOURCE_EXHAUSTED" in reason
    else:
        tunnel.send_fragments(["x" * (256 << 10)] * 384)
        code, reason = tunnel.closed()
        assert code == 1009 and "1048584 bytes" in reason, (code, reason)  # cut at the limit, not at the end
    assert peak_rss(cluster.gateway.pid) - rss_before < 48 << 20  # at its worst while the message arrived


def test_a_client_cannot_push_a_huge_dataset_name_into_its_tunnel(attack):
    cluster, connect = attack
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(pa.ArrowInvalid, match="dataset name") as info:
            client.get_flight_info(sales("x" * 1_500_000), bearer(cluster.tenants["tenant_002"].client_token))
    assert "Traceback" not in str(info.value)


def test_clients_see_messages_not_tracebacks(attack):
    cluster, _ = attack
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(pa.ArrowKeyError) as info:
            client.get_flight_info(sales("no_such_table"), bearer(cluster.tenants["tenant_002"].client_token))
    text = str(info.value)
    assert "no_such_table" in text and "Traceback" not in text and ".py" not in text

