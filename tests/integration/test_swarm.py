"""Hundreds of tunnels from one process (`python -m poc swarm`): the mechanism behind the 10,000-tunnel runs."""

from __future__ import annotations

import time

from poc.config import make_tenants
from poc.workbook.servers.runner import Cluster, start_component
from tests.helpers import read


def test_a_swarm_registers_every_tunnel_and_serves_and_leaves(tmp_path, datasets):
    tenants = make_tenants(300, seed=3)
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False, with_connectors=False) as c:
        swarm = start_component("swarm", ["swarm", "--gateway", c.ws_url, "--tenants", str(c.tenants_file),
                                          "--heartbeat-s", "5"], c.log_dir, ready_timeout=120)
        c.components["swarm"] = swarm
        assert swarm.ready["tunnels"] == 300
        health = c.health()
        assert health["tenants_online"] == 300
        assert "open-files limit" in c.gateway.log_tail(10_000)
        info, table = read(c.flight_uri, tenants["tenant_150"].client_token, name="tiny")
        assert table.num_rows == 10 and info.total_records == 10
        swarm.stop()
        deadline = time.monotonic() + 15
        while c.health()["tenants_online"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.health()["tenants_online"] == 0
