"""However a DoGet ends, its stream is freed: streams in flight and the gateway's reserved buffer return to 0."""

from __future__ import annotations

import time

import pyarrow.flight as flight
import pytest

from poc.auth import TicketSigner
from poc.config import make_tenants
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, sales

SECRET = "lifecycle-ticket-secret"


@pytest.fixture
def cluster(tmp_path, tenants, datasets, monkeypatch):
    """The large table, a 20 s extraction delay for tenant_001 (so a stream can be left before its schema)
    and none for tenant_002; small windows so that a slow reader holds the stream open."""
    monkeypatch.setenv("POC_TICKET_SECRET", SECRET)
    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False,
                 with_connectors=False) as c:
        c.start_connector("tenant_001", extra=("--delay-ms", "20000"))
        c.start_connector("tenant_002")
        c.wait_online(list(tenants))
        yield c


def freed(cluster: Cluster, timeout: float = 10) -> dict:
    """Wait until no stream is in flight and nothing is reserved; the last /health view."""
    deadline = time.monotonic() + timeout
    while True:
        health = cluster.health()
        if (health["streams_in_flight"] == 0 and health["buffer_reserved_bytes"] == 0) or time.monotonic() > deadline:
            return health


def open_reader(cluster, tenant: str, timeout: float = 30):
    client = flight.connect(cluster.flight_uri)
    options = bearer(cluster.tenants[tenant].client_token, timeout=timeout)
    ticket = client.get_flight_info(sales(), options).endpoints[0].ticket
    return client, client.do_get(ticket, options)


def wait_streaming(cluster: Cluster) -> None:
    deadline = time.monotonic() + 10
    while cluster.health()["streams_in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cluster.health()["buffer_reserved_bytes"] > 0


def test_end_frees_the_stream(cluster):
    client, reader = open_reader(cluster, "tenant_002")
    assert reader.read_all().num_rows == 1_000_000
    client.close()
    assert freed(cluster)["streams_in_flight"] == 0


def test_a_client_that_cancels_mid_stream_frees_it(cluster):
    client, reader = open_reader(cluster, "tenant_002")
    reader.read_chunk()
    wait_streaming(cluster)
    reader.cancel()
    client.close()
    health = freed(cluster)
    assert health["streams_in_flight"] == 0 and health["buffer_reserved_bytes"] == 0


def test_a_client_whose_deadline_passes_mid_stream_frees_it(cluster):
    client, reader = open_reader(cluster, "tenant_002", timeout=1.5)
    reader.read_chunk()
    wait_streaming(cluster)
    time.sleep(2)  # the deadline passes while the stream waits for credit
    with pytest.raises(flight.FlightError):
        reader.read_all()
    client.close()
    assert freed(cluster)["streams_in_flight"] == 0


def test_a_client_gone_before_the_schema_frees_the_stream(cluster):
    """The connector would send its schema after 20 s: the stream must be freed long before that."""
    client = flight.connect(cluster.flight_uri)
    options = bearer(cluster.tenants["tenant_001"].client_token, timeout=1)
    ticket = client.get_flight_info(sales(), bearer(cluster.tenants["tenant_001"].client_token)).endpoints[0].ticket
    with pytest.raises(flight.FlightTimedOutError):
        client.do_get(ticket, options).read_all()
    client.close()
    health = freed(cluster, timeout=10)
    assert health["streams_in_flight"] == 0 and health["buffer_reserved_bytes"] == 0


def test_a_connector_error_frees_the_stream(cluster):
    ticket = flight.Ticket(TicketSigner(SECRET.encode()).issue("tenant_002", "no_such_dataset"))
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(KeyError, match="no_such_dataset"):
            client.do_get(ticket, bearer(cluster.tenants["tenant_002"].client_token)).read_all()
    assert freed(cluster)["streams_in_flight"] == 0


def test_a_ticket_naming_no_valid_dataset_never_crosses_the_tunnel(cluster):
    """Tickets signed with the (shared, leakable) ticket secret but naming what no GetFlightInfo would issue:
    each refused at the gateway; the tenant's tunnel is the same one afterwards and serves on."""
    session = cluster.health()["tenants"]["tenant_002"]["session_id"]
    with flight.connect(cluster.flight_uri) as client:
        for name in ("../../etc/passwd", "x" * 300, ""):
            ticket = flight.Ticket(TicketSigner(SECRET.encode()).issue("tenant_002", name))
            with pytest.raises(flight.FlightUnauthorizedError, match="malformed ticket"):
                client.do_get(ticket, bearer(cluster.tenants["tenant_002"].client_token)).read_all()
    _, reader = open_reader(cluster, "tenant_002")
    assert reader.read_all().num_rows == 1_000_000
    assert cluster.health()["tenants"]["tenant_002"]["session_id"] == session


def test_an_expired_ticket_is_refused(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=("--ticket-ttl-s", "0.5"),
                 with_direct=False) as c:
        options = bearer(tenants["tenant_001"].client_token)
        with flight.connect(c.flight_uri) as client:
            ticket = client.get_flight_info(sales(), options).endpoints[0].ticket
            assert client.do_get(ticket, options).read_all().num_rows == 20_000
            time.sleep(1)
            with pytest.raises(flight.FlightUnauthorizedError, match="ticket expired"):
                client.do_get(ticket, options).read_all()


def test_the_buffer_caps_refuse_new_streams_with_their_reason(tmp_path, datasets):
    """Each tenant may reserve 2 MiB (one window) of the gateway's 6 MiB: three tenants' streams fill it; the
    first tenant's second stream is refused by its share, a fourth tenant's by the gateway-wide cap, and that
    tenant is served once another's stream ends. No tenant alone can reach the gateway-wide cap."""
    tenants = make_tenants(4)
    a, b, c, d = tenants
    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20), "--max-buffered-bytes", str(6 << 20),
            "--max-tenant-buffered-bytes", str(2 << 20))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False) as cluster:
        first = [open_reader(cluster, tenant) for tenant in (a, b, c)]
        for _, reader in first:
            reader.read_chunk()
        with pytest.raises(flight.FlightUnavailableError, match=f"tenant {a} is at its share"):
            open_reader(cluster, a)[1].read_all()
        with pytest.raises(flight.FlightUnavailableError, match="gateway is at its buffer limit"):
            open_reader(cluster, d)[1].read_all()
        assert first[2][1].read_all().num_rows > 0
        first[2][0].close()
        _, reader = open_reader(cluster, d)
        assert reader.read_all().num_rows == 1_000_000
        for client, reader in first[:2]:
            reader.cancel()
            client.close()
