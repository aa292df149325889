"""Flight through the tunnel, end to end: real processes, real sockets, real pyarrow.flight clients."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pyarrow.flight as flight
import pyarrow.parquet as pq

from poc import config
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, read, sales


def test_two_tenants_each_receive_exactly_their_own_table(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["a"], with_connectors=False, with_direct=False) as c:
        c.start_connector("tenant_001", data=datasets["a"])
        c.start_connector("tenant_002", data=datasets["b"])
        c.wait_online(["tenant_001", "tenant_002"])
        with ThreadPoolExecutor(2) as pool:
            got = dict(zip(tenants, pool.map(lambda t: read(c.flight_uri, tenants[t].client_token)[1], tenants)))
    expected_a = pq.read_table(datasets["a"] / "sales.parquet")
    expected_b = pq.read_table(datasets["b"] / "sales.parquet")
    assert got["tenant_001"].equals(expected_a)
    assert got["tenant_002"].equals(expected_b)
    assert not got["tenant_001"].equals(expected_b)


def test_tunnel_and_direct_serve_identical_tables_and_flight_info(cluster, tenants, datasets):
    token = tenants["tenant_001"].client_token
    info_t, via_tunnel = read(cluster.flight_uri, token)
    info_d, direct = read(cluster.direct_uri, token)
    expected = pq.read_table(datasets["a"] / "sales.parquet")
    assert via_tunnel.equals(expected) and direct.equals(expected)
    assert info_t.total_records == info_d.total_records == expected.num_rows
    assert info_t.total_bytes == info_d.total_bytes > 0
    assert info_t.schema.equals(expected.schema)


def test_list_flights_lists_the_callers_datasets(cluster, tenants):
    with flight.connect(cluster.flight_uri) as client:
        listed = list(client.list_flights(options=bearer(tenants["tenant_002"].client_token)))
    assert sorted(tuple(f.descriptor.path) for f in listed) == [(b"dataset", b"orders"), (b"dataset", b"sales")]
    assert {f.total_records for f in listed} == {2_000, 200_000}


def test_hundred_concurrent_dogets_share_one_websocket(tmp_path, tenants, datasets):
    expected = pq.read_table(datasets["small"] / "sales.parquet")
    with Cluster(tmp_path, tenants, datasets["small"], delay_ms="150-200", with_direct=False) as c:
        before = c.health()["tenants"]["tenant_001"]["session_id"]
        token = tenants["tenant_001"].client_token
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], c.health()["tenants"]["tenant_001"]["streams_in_flight"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with flight.connect(c.flight_uri) as client, ThreadPoolExecutor(100) as pool:
                info = client.get_flight_info(sales(), bearer(token))
                ticket = info.endpoints[0].ticket
                tables = list(pool.map(lambda _: client.do_get(ticket, bearer(token)).read_all(), range(100)))
        finally:
            done.set()
            watcher.join()
        connector = psutil.Process(c.components["connector-tenant_001"].pid)
        sockets = connector.net_connections(kind="inet")
        after = c.health()["tenants"]["tenant_001"]["session_id"]
    assert len(tables) == 100 and all(t.equals(expected) for t in tables)
    assert before == after  # the same single registration served all of them
    assert peak[0] >= 10, f"streams were not concurrent on the link (peak {peak[0]})"
    # one socket, and no listening port; the Flight tunnel's control call has a connection of its own and its data
    # calls up to FLIGHT_TUNNEL_CHANNELS more (a channel is dialled once the ones before hold 16 streams: how many
    # depends on how many of the 100 were open at once)
    assert {s.status for s in sockets} == {psutil.CONN_ESTABLISHED}
    if c.tunnel == "flight":
        assert 2 <= len(sockets) <= 1 + config.FLIGHT_TUNNEL_CHANNELS, sockets
    else:
        assert len(sockets) == 1, sockets


def test_batches_larger_than_grpc_defaults_pass_through(tmp_path, tenants, datasets):
    """8 MiB batches: over gRPC's 4 MB default message limit, within the gateway's own frame limit."""
    args = ("--max-frame-bytes", str(12 << 20), "--window-bytes", str(24 << 20))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False,
                 connector_args=("--batch-bytes", str(8 << 20))) as c:
        _, table = read(c.flight_uri, tenants["tenant_001"].client_token)
        log = c.components["connector-tenant_001"].log_tail()
    assert table.equals(pq.read_table(datasets["large"] / "sales.parquet"))
    assert max(b.nbytes for b in table.to_batches()) > 4 << 20
    assert "error" not in log.lower()
