"""TLS on both hops, per-link limits, and secrets that never reach a log."""

from __future__ import annotations

import re
import threading
import time

import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.workbook.servers.certs import make_test_pki
from poc.workbook.load.client import LoadConfig, run_load
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, sales


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_tls_tunnel_and_flight_serve_the_same_table(tmp_path, tenants, datasets, pki):
    with Cluster(tmp_path, tenants, datasets["a"], tls=pki) as c:
        assert c.ws_url.startswith(("wss://", "flight+tls://")) and c.flight_uri.startswith("grpc+tls://")
        token = tenants["tenant_001"].client_token
        tables = []
        for uri in (c.flight_uri, c.direct_uri):
            with flight.connect(uri, tls_root_certs=pki.ca.read_bytes()) as client:
                info = client.get_flight_info(sales(), bearer(token))
                tables.append(client.do_get(info.endpoints[0].ticket, bearer(token)).read_all())
        records = run_load(LoadConfig(c.flight_uri, {"tenant_001": token}, requests=4, concurrency=2,
                                      tls_root_certs=pki.ca.read_bytes(), progress=False))
    expected = pq.read_table(datasets["a"] / "sales.parquet")
    assert all(t.equals(expected) for t in tables)
    assert [r.status for r in records] == ["success"] * 4


def test_tls_peers_that_do_not_trust_the_gateway_are_refused(tmp_path, tenants, datasets, pki):
    other_ca = make_test_pki(tmp_path / "other").ca
    with Cluster(tmp_path, tenants, datasets["a"], tls=pki, with_direct=False, with_connectors=False) as c:
        with flight.connect(c.flight_uri) as client:  # system roots only: the test CA is unknown
            with pytest.raises(flight.FlightUnavailableError):
                client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token, timeout=5))
        connector = c.start_connector("tenant_001", extra=("--ca-file", str(other_ca)), wait=False)
        # the handshake's own reason, as Python's ssl and gRPC (or Arrow's gRPC) word it: a timeout does not pass
        refusal = re.compile("CERTIFICATE_VERIFY_FAILED|certificate verify failed")
        deadline = time.monotonic() + 20
        while not refusal.search(connector.log_tail()) and time.monotonic() < deadline:
            time.sleep(0.1)
        state = c.health()["tenants"]["tenant_001"]["status"]
    assert refusal.search(connector.log_tail())
    assert state == "offline"


def test_request_rate_limit_refuses_excess_calls_clearly(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=("--max-requests-per-s", "2"),
                 with_direct=False) as c:
        outcomes = []
        with flight.connect(c.flight_uri) as client:
            for _ in range(8):
                try:
                    client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token))
                    outcomes.append("ok")
                except flight.FlightUnavailableError as exc:
                    outcomes.append(str(exc).split(".")[0])
            other = client.get_flight_info(sales(), bearer(tenants["tenant_002"].client_token)).total_records
    assert outcomes[:2] == ["ok", "ok"]
    assert "tenant tenant_001 is over its request rate of 2/s; retry later" in outcomes
    assert other == 20_000  # the limit is per tenant link


def test_streams_in_flight_limit_refuses_clearly(tmp_path, tenants, datasets):
    args = ("--max-streams", "2", "--window-bytes", str(1 << 20), "--max-frame-bytes", str(512 << 10))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False,
                 delay_ms="3000") as c:
        token = tenants["tenant_001"].client_token
        with flight.connect(c.flight_uri) as client:
            ticket = client.get_flight_info(sales(), bearer(token)).endpoints[0].ticket
            pending = [threading.Thread(target=lambda: client.do_get(ticket, bearer(token, timeout=30)).read_all())
                       for _ in range(2)]
            for t in pending:
                t.start()
            deadline = time.monotonic() + 10
            while c.health()["tenants"]["tenant_001"]["streams_in_flight"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(flight.FlightUnavailableError, match="limit 2"):
                client.do_get(ticket, bearer(token)).read_all()
            for t in pending:
                t.join()


def test_tokens_never_reach_the_logs(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"]) as c:
        with flight.connect(c.flight_uri) as client:
            for token in (tenants["tenant_001"].client_token, "wrong-client-token"):
                try:
                    client.get_flight_info(sales(), bearer(token))
                except flight.FlightUnauthenticatedError:
                    pass
        bad = c.start_connector("tenant_002", token="wrong-connector-token", name="bad-connector", wait=False)
        bad.popen.wait(30)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "refused a connector for tenant 'tenant_002'" in logs
    secrets = [t.connector_token for t in tenants.values()] + [t.client_token for t in tenants.values()]
    for secret in secrets + ["wrong-client-token", "wrong-connector-token"]:
        assert secret not in logs


def test_the_per_tenant_view_needs_the_admin_token(tmp_path, tenants, datasets):
    import json
    import urllib.error
    import urllib.request

    def get(url: str, token: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False) as c:
        base = c.health_url.rsplit("/", 1)[0]
        public = [get(f"{base}/livez"), get(f"{base}/readyz")]
        refused = [get(c.health_url), get(c.health_url, "not-the-admin-token"),
                   get(c.health_url, tenants["tenant_001"].client_token)]
        status, body = get(c.health_url, c.admin_token)
    assert [s for s, _ in public] == [200, 200]
    assert [s for s, _ in refused] == [401, 401, 401]
    for _, text in public + refused:
        assert not any(t in text for t in tenants) and "sess_" not in text
    assert status == 200 and set(json.loads(body)["tenants"]) == set(tenants)
