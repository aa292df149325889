"""Prometheus metrics and usage: they parse, and they move as data flows."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poc.workbook.servers.runner import get_json
from tests.helpers import read


def scrape(url: str, token: str | None = None) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} of a /metrics page, parsed by prometheus_client."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_gateway_metrics_count_what_a_doget_relays(cluster, tenants, ws_impl):
    url = cluster.health_url.replace("/health", "/metrics")
    before = scrape(url, cluster.admin_token)
    info, table = read(cluster.flight_uri, tenants["tenant_001"].client_token)
    after = scrape(url, cluster.admin_token)

    def grew(name, **labels):
        key = (name, *sorted(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("poc_gateway_relayed_bytes_total", tenant="tenant_001") == info.total_bytes
    assert grew("poc_gateway_relayed_rows_total", tenant="tenant_001") == table.num_rows == info.total_records
    assert grew("poc_gateway_relayed_bytes_total", tenant="tenant_002") == 0
    assert grew("poc_gateway_flight_requests_total", method="do_get", outcome="ok") == 1
    assert grew("poc_gateway_flight_requests_total", method="get_flight_info", outcome="ok") == 1
    assert grew("poc_gateway_flight_request_seconds_count", method="do_get") == 1
    assert after[("poc_gateway_tunnels", ("transport", ws_impl))] == 2
    assert after[("poc_gateway_registrations_total", ("result", "ok"))] >= 2
    assert after[("poc_gateway_streams_active",)] == 0 and after[("poc_gateway_buffered_bytes",)] == 0
    usage = get_json(cluster.health_url.replace("/health", "/v1/usage"), token=cluster.admin_token)
    assert usage["tenant_001"]["sales"]["rows"] >= table.num_rows and usage["tenant_001"]["sales"]["requests"] >= 1


@pytest.mark.parametrize("path", ["/metrics", "/v1/usage"])
def test_metrics_and_usage_need_the_admin_token(cluster, path):
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape(cluster.health_url.replace("/health", path))
    assert info.value.code == 401


def test_connector_metrics_on_its_own_port(cluster, tenants, datasets):
    connector = cluster.start_connector("tenant_002", data=datasets["small"], extra=("--metrics-port", "0"),
                                        name="metered-connector")
    deadline = time.monotonic() + 10
    while cluster.health()["tenants"]["tenant_002"]["session_id"] != connector.ready["session_id"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info, table = read(cluster.flight_uri, tenants["tenant_002"].client_token)
    metrics = scrape(f"http://127.0.0.1:{connector.ready['metrics_port']}/metrics")
    assert metrics[("poc_connector_registered",)] == 1
    assert metrics[("poc_connector_requests_total", ("kind", "do_get"))] == 1
    assert metrics[("poc_connector_sent_bytes_total",)] == info.total_bytes
