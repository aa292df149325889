"""Tenants added, removed and rotated without a restart: SIGHUP (and POST /v1/tenants/reload) reread the file."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pyarrow.flight as flight
import pytest

from poc.config import TenantCredentials, make_tenants, write_tenants
from poc.workbook.servers.runner import Cluster
from tests.helpers import read


def reloaded(cluster: Cluster, count: int, timeout: float = 10) -> None:
    """Wait for the gateway's `count`-th "tenants file reloaded" (or "not reloaded") log line."""
    deadline = time.monotonic() + timeout
    while cluster.gateway.log_tail(10_000).count("reloaded") < count:
        assert time.monotonic() < deadline, cluster.gateway.log_tail()
        time.sleep(0.05)


def hup(cluster: Cluster, tenants: dict, count: int) -> None:
    write_tenants(cluster.tenants_file, tenants)
    cluster.gateway.popen.send_signal(signal.SIGHUP)
    reloaded(cluster, count)


def test_sighup_adds_removes_and_rotates_tenants(tmp_path, datasets):
    tenants = make_tenants(2)
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False) as c:
        t1, t2 = tenants["tenant_001"], tenants["tenant_002"]
        new = make_tenants(3)["tenant_003"]
        rotated = TenantCredentials("tenant_001", "connector-token-rotated", "client-token-rotated")
        hup(c, {"tenant_001": rotated, "tenant_003": new}, 1)
        # removed: its tunnel is closed with 4006, its connector stops, its clients are refused
        assert c.components["connector-tenant_002"].popen.wait(15) == 3
        with pytest.raises(flight.FlightUnauthenticatedError):
            read(c.flight_uri, t2.client_token)
        # added: registers and serves at once
        c.tenants["tenant_003"] = new
        c.start_connector("tenant_003")
        assert read(c.flight_uri, new.client_token)[1].num_rows == 20_000
        # rotated client token: the old one is refused from the next call, the new one works
        with pytest.raises(flight.FlightUnauthenticatedError):
            read(c.flight_uri, t1.client_token)
        assert read(c.flight_uri, rotated.client_token)[1].num_rows == 20_000  # the old tunnel still serves
        # rotated connector token: required at the next registration
        old = c.start_connector("tenant_001", token=t1.connector_token, name="old-token", wait=False)
        assert old.popen.wait(30) == 3
        c.start_connector("tenant_001", token=rotated.connector_token, name="new-token")
        assert read(c.flight_uri, rotated.client_token)[1].num_rows == 20_000
    assert "4006" in c.components["connector-tenant_002"].log_tail() or \
        "removed" in c.components["connector-tenant_002"].log_tail()


def test_a_broken_tenants_file_changes_nothing(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False) as c:
        c.tenants_file.write_text("tenants: [this is: not: valid")
        c.gateway.popen.send_signal(signal.SIGHUP)
        reloaded(c, 1)
        assert "not reloaded, the previous configuration stays in force" in c.gateway.log_tail()
        assert read(c.flight_uri, tenants["tenant_001"].client_token)[1].num_rows == 20_000
        assert c.gateway.popen.poll() is None


def test_the_admin_reload_call_reports_what_changed(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False) as c:
        write_tenants(c.tenants_file, {**tenants, **{"tenant_009": make_tenants(9)["tenant_009"]}})
        request = urllib.request.Request(c.health_url.replace("/health", "/v1/tenants/reload"), method="POST",
                                         headers={"authorization": f"Bearer {c.admin_token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            result = json.load(response)
    assert result == {"status": "ok", "tenants": 3, "added": ["tenant_009"], "removed": [],
                      "client_tokens_rotated": [], "connector_tokens_rotated": []}
