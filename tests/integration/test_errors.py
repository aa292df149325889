"""What a client sees when things go wrong: a clear Flight error, never a hang or a wrong answer."""

from __future__ import annotations

import time

import pyarrow.flight as flight
import pytest

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, sales


def test_offline_tenant_fails_at_once_with_unavailable(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["a"], with_connectors=False, with_direct=False) as c:
        with flight.connect(c.flight_uri) as client:
            with pytest.raises(flight.FlightUnavailableError, match="tenant_001 is offline"):
                client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token, timeout=5))
            with pytest.raises(flight.FlightUnavailableError, match="offline"):
                list(client.list_flights(options=bearer(tenants["tenant_001"].client_token, timeout=5)))


def test_unknown_dataset_is_a_clear_not_found(cluster, tenants):
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(KeyError, match="dataset 'missing' not found"):
            client.get_flight_info(sales("missing"), bearer(tenants["tenant_001"].client_token))


def test_connector_killed_mid_stream_fails_the_client(tmp_path, tenants, datasets):
    """Its stream waits for the connector for the resume window (1 s here, docs/protocol.md §6a), then fails."""
    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20), "--resume-window-s", "1")
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False) as c:
        token = tenants["tenant_001"].client_token
        with flight.connect(c.flight_uri) as client:
            info = client.get_flight_info(sales(), bearer(token))
            reader = client.do_get(info.endpoints[0].ticket, bearer(token))
            first = reader.read_chunk()
            assert first.data.num_rows > 0
            c.components["connector-tenant_001"].popen.kill()
            rows = first.data.num_rows
            with pytest.raises(flight.FlightUnavailableError, match="disconnected.*did not come back within"):
                while True:
                    rows += reader.read_chunk().data.num_rows
            assert rows < info.total_records
            deadline = time.monotonic() + 10
            while c.health()["tenants"]["tenant_001"]["status"] != "offline" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health()["tenants"]["tenant_001"]["status"] == "offline"
            # the other tenant is untouched
            assert c.health()["tenants"]["tenant_002"]["status"] == "online"
            assert client.get_flight_info(sales(), bearer(tenants["tenant_002"].client_token)).total_records == 1_000_000


def test_connector_with_wrong_token_is_refused_and_exits(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["a"], with_connectors=False, with_direct=False) as c:
        bad = c.start_connector("tenant_001", token="wrong-token-123", wait=False)
        assert bad.popen.wait(30) == 3
        assert "refused the registration (unauthenticated): invalid token for tenant 'tenant_001'" in bad.log_tail()
        assert "wrong-token-123" not in bad.log_tail() + c.gateway.log_tail()
        assert c.health()["tenants"]["tenant_001"]["status"] == "offline"
