"""Faults: connectors come back by themselves, dead links are found, nothing ends in a short table."""

from __future__ import annotations

import re
import signal
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, read, sales
from poc.workbook.emulation.faults import TcpProxy

SMALL_WINDOW = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def slow_stream(cluster: Cluster, token: str):
    """A DoGet that has read one batch and then stops reading."""
    client = flight.connect(cluster.flight_uri)
    info = client.get_flight_info(sales(), bearer(token))
    reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
    first = reader.read_chunk().data
    return client, reader, first, info


def drain(reader, rows: int) -> int:
    while True:
        try:
            rows += reader.read_chunk().data.num_rows
        except StopIteration:
            return rows


def test_gateway_restart_connectors_reconnect_register_and_serve_again(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False) as c:
        before = {t: s["session_id"] for t, s in c.health()["tenants"].items()}
        c.restart_gateway(downtime_s=1.5)
        c.wait_online(list(tenants), timeout=30, session_not=before)
        _, table = read(c.flight_uri, tenants["tenant_002"].client_token)
        logs = [c.components[f"connector-{t}"].log_tail(50) for t in tenants]
    assert table.equals(pq.read_table(datasets["small"] / "sales.parquet"))
    for log in logs:
        attempts = [(float(d), int(n)) for d, n in re.findall(r"reconnecting in ([\d.]+) s \(attempt (\d+)\)", log)]
        assert 1 <= len(attempts) <= 6, attempts  # backoff, not a storm of attempts
        for delay, n in attempts:  # exponential with jitter: base/2 <= delay <= base
            base = min(30.0, 0.5 * 2 ** (n - 1))
            assert base / 2 <= delay <= base, (delay, n)


def test_returning_connectors_spread_out_instead_of_storming(tmp_path, datasets):
    from poc.config import make_tenants
    many = make_tenants(6)
    with Cluster(tmp_path, many, datasets["small"], with_direct=False) as c:
        before = {t: s["session_id"] for t, s in c.health()["tenants"].items()}
        c.restart_gateway(downtime_s=2.0)
        c.wait_online(list(many), timeout=30, session_not=before)
        first_delays = []
        for t in many:
            found = re.findall(r"reconnecting in ([\d.]+) s \(attempt 1\)", c.components[f"connector-{t}"].log_tail(50))
            first_delays += [float(d) for d in found[-1:]]
    assert len(first_delays) == 6
    assert max(first_delays) - min(first_delays) > 0.01  # jitter: they do not all come back at the same instant


def test_dropped_link_reconnects_and_serves(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False, with_connectors=False) as c:
        with TcpProxy(c.tunnel_port) as proxy:
            c.start_connector("tenant_001", url=c.tunnel_url(proxy.port))
            first = c.wait_online(["tenant_001"])["tenants"]["tenant_001"]["session_id"]
            proxy.drop()
            c.wait_online(["tenant_001"], session_not={"tenant_001": first})
            _, table = read(c.flight_uri, tenants["tenant_001"].client_token)
    assert table.num_rows == 20_000


def test_half_open_link_is_detected_within_the_timeout_and_requests_fail_fast(tmp_path, tenants, datasets):
    args = ("--offline-after-s", "2")
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_direct=False,
                 with_connectors=False) as c:
        with TcpProxy(c.tunnel_port) as proxy:
            c.start_connector("tenant_001", url=c.tunnel_url(proxy.port),
                              extra=("--heartbeat-s", "0.5"))
            c.wait_online(["tenant_001"])
            time.sleep(3)  # heartbeats keep a healthy link online past the timeout
            assert c.health()["tenants"]["tenant_001"]["status"] == "online"
            proxy.blackhole()
            start = time.monotonic()
            wait_for(lambda: c.health()["tenants"]["tenant_001"]["status"] == "offline", timeout=10)
            detected_s = time.monotonic() - start
            with flight.connect(c.flight_uri) as client:
                with pytest.raises(flight.FlightUnavailableError, match="offline"):
                    client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token, timeout=5))
            proxy.heal()
            c.wait_online(["tenant_001"], timeout=30)
            _, table = read(c.flight_uri, tenants["tenant_001"].client_token)
    assert 1.5 <= detected_s <= 4.0  # the 2 s timeout, checked every 0.5 s
    assert table.num_rows == 20_000
    assert "no heartbeat for 2 s" in c.gateway.log_tail(100)


def test_client_cancel_stops_the_connector_stream_and_frees_it(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=SMALL_WINDOW, with_direct=False) as c:
        token = tenants["tenant_001"].client_token
        client, reader, first, _ = slow_stream(c, token)
        assert c.health()["tenants"]["tenant_001"]["streams_in_flight"] == 1
        reader.cancel()
        client.close()
        wait_for(lambda: c.health()["tenants"]["tenant_001"]["streams_in_flight"] == 0)
        connector_log = wait_for(lambda: (log := c.components["connector-tenant_001"].log_tail(20))
                                 and "cancelled by the gateway" in log and log)
        _, table = read(c.flight_uri, token)  # the link is fine afterwards
    assert first.num_rows > 0 and table.num_rows == 1_000_000
    assert re.search(r"stream \d+ cancelled by the gateway", connector_log)


def test_second_registration_replaces_the_first_whose_streams_fail_clearly(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=SMALL_WINDOW, with_direct=False) as c:
        token = tenants["tenant_001"].client_token
        old_session = c.health()["tenants"]["tenant_001"]["session_id"]
        client, reader, first, info = slow_stream(c, token)
        newer = c.start_connector("tenant_001", name="connector-tenant_001-new", data=datasets["small"])
        with pytest.raises(flight.FlightUnavailableError, match="replaced by a new registration"):
            drain(reader, first.num_rows)
        client.close()
        old = c.components["connector-tenant_001"]
        assert old.popen.wait(15) == 4  # the replaced connector stops instead of fighting back
        assert "replaced by a new registration" in old.log_tail()
        state = c.health()["tenants"]["tenant_001"]
        _, table = read(c.flight_uri, token)
    assert state["session_id"] not in (None, old_session) and newer.ready["session_id"] == state["session_id"]
    assert table.num_rows == 20_000  # served by the newer connector's data


def test_gateway_sigterm_ends_unfinished_streams_with_an_error_and_exits(tmp_path, tenants, datasets):
    args = (*SMALL_WINDOW, "--shutdown-grace-s", "1")
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False) as c:
        client, reader, first, info = slow_stream(c, tenants["tenant_001"].client_token)
        connector = c.components["connector-tenant_001"].popen
        connector.send_signal(signal.SIGSTOP)  # the stream cannot finish: its connector is frozen mid-way
        try:
            code = c.gateway.stop(timeout=20)
            with pytest.raises(flight.FlightUnavailableError, match="gateway shutting down"):
                drain(reader, first.num_rows)
        finally:
            connector.send_signal(signal.SIGCONT)
            client.close()
    assert code == 0
    assert "gateway shutting down" in c.gateway.log_tail()


def test_gateway_sigterm_lets_a_stream_that_is_being_read_finish(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=SMALL_WINDOW, with_direct=False) as c:
        client, reader, first, info = slow_stream(c, tenants["tenant_001"].client_token)
        stopper = threading.Thread(target=c.gateway.stop, kwargs={"timeout": 20})
        stopper.start()
        time.sleep(0.3)
        with pytest.raises(flight.FlightUnavailableError, match="shutting down"):
            client.get_flight_info(sales(), bearer(tenants["tenant_002"].client_token))
        rows = drain(reader, first.num_rows)  # within the 10 s grace
        stopper.join()
        client.close()
    assert rows == info.total_records


def test_a_draining_gateway_is_not_ready_and_refuses_new_tunnels(tmp_path, tenants, datasets):
    """During the SIGTERM grace: /readyz answers 503, /livez 200, and a new tunnel is closed with 1001
    (the Flight tunnel included) instead of registering into a gateway that is going away."""
    from poc.workbook.servers.runner import get_json
    from tests.hostile import RawConnector, flight_headers
    import urllib.error

    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=SMALL_WINDOW, with_direct=False) as c:
        base = c.health_url.rsplit("/", 1)[0]
        assert get_json(f"{base}/readyz") == {"status": "ready"}
        client, reader, first, info = slow_stream(c, tenants["tenant_001"].client_token)
        stopper = threading.Thread(target=c.gateway.stop, kwargs={"timeout": 20})
        stopper.start()
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            get_json(f"{base}/readyz")
        assert not_ready.value.code == 503 and get_json(f"{base}/livez") == {"status": "alive"}
        if c.tunnel == "flight":  # the WebSocket server stops accepting at once; the Flight one refuses the tunnel
            tunnel = RawConnector(c.ws_url, "flight", flight_headers("tenant_002", tenants["tenant_002"].connector_token))
            tunnel.send('{"action":"register","tenant_id":"tenant_002","token":"%s","version":"1","datasets":[]}'
                        % tenants["tenant_002"].connector_token)
            assert tunnel.closed()[0] == 1001
            tunnel.close()
        drain(reader, first.num_rows)
        stopper.join()
        client.close()


def test_connectors_heartbeat_at_the_gateways_interval(tmp_path, tenants, datasets):
    """The gateway announces heartbeat_s in `registered`; a connector configured for 60 s must follow it,
    or a gateway whose offline timeout is shorter would take it offline."""
    args = ("--heartbeat-s", "0.3", "--offline-after-s", "1.5")
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_direct=False,
                 connector_args=("--heartbeat-s", "60")) as c:
        sessions = {t: s["session_id"] for t, s in c.health()["tenants"].items()}
        time.sleep(4)
        health = c.health()["tenants"]
    assert all(health[t]["status"] == "online" and health[t]["session_id"] == sessions[t] for t in tenants)
    assert all(health[t]["last_heartbeat"] is not None for t in tenants)


# -- streams cut off with their tunnel (docs/protocol.md §6a)

def gateway_metric(cluster: Cluster, name: str, **labels) -> float:
    from tests.integration.test_metrics import scrape

    return scrape(cluster.health_url.replace("/health", "/metrics"), cluster.admin_token).get(
        (name, *sorted(labels.items())), 0.0)


def read_rest(reader, first) -> pa.Table:
    batches = [first]
    while True:
        try:
            batches.append(reader.read_chunk().data)
        except StopIteration:
            return pa.Table.from_batches(batches)


def half_sent_behind(cluster: Cluster, proxy: TcpProxy, token: str):
    """tenant_001's connector dials through `proxy`; a DoGet of its dataset reads one batch and stops, its stream
    open at the gateway. Returns the tunnel's session id, the client, its reader and the batch read."""
    cluster.start_connector("tenant_001", url=cluster.tunnel_url(proxy.port))
    session = cluster.wait_online(["tenant_001"])["tenants"]["tenant_001"]["session_id"]
    client, reader, chunk, _ = slow_stream(cluster, token)
    wait_for(lambda: cluster.health()["tenants"]["tenant_001"]["streams_in_flight"] == 1)
    return session, client, reader, chunk


def test_a_stream_cut_off_with_its_tunnel_resumes_and_the_client_gets_the_exact_table(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["a"], gateway_args=SMALL_WINDOW, with_direct=False,
                 with_connectors=False) as c:
        with TcpProxy(c.tunnel_port) as proxy:
            first, client, reader, chunk = half_sent_behind(c, proxy, tenants["tenant_001"].client_token)
            proxy.drop()  # the tunnel is cut while the stream is half sent
            c.wait_online(["tenant_001"], session_not={"tenant_001": first})
            got = read_rest(reader, chunk)  # no error: the stream went on from its next row
            client.close()
            resumed = gateway_metric(c, "poc_gateway_streams_resumed_total", outcome="resumed")
            log = c.components["connector-tenant_001"].log_tail(200)
    assert got.equals(pq.read_table(datasets["a"] / "sales.parquet"))
    assert resumed == 1
    assert re.search(r"do_get sales resumed from row [1-9]\d*", log)


def test_a_dataset_changed_while_its_stream_was_cut_off_fails_never_short(tmp_path, tenants, datasets):
    folder = tmp_path / "data"
    folder.mkdir()
    file = folder / "sales.parquet"
    file.write_bytes((datasets["a"] / "sales.parquet").read_bytes())
    with Cluster(tmp_path / "c", tenants, folder, gateway_args=SMALL_WINDOW, with_direct=False) as c:
        client, reader, chunk, _ = slow_stream(c, tenants["tenant_001"].client_token)
        old = c.components["connector-tenant_001"]
        old.popen.kill()  # the connector's host goes down; its file changes before it comes back
        old.popen.wait(10)
        file.write_bytes((datasets["b"] / "sales.parquet").read_bytes())
        c.start_connector("tenant_001", name="connector-tenant_001-again", data=folder)
        with pytest.raises(flight.FlightUnavailableError, match="changed since its stream began"):
            read_rest(reader, chunk)
        client.close()


def test_a_query_cut_off_fails_at_once_and_a_stream_left_without_connector_fails_after_the_window(
        tmp_path, tenants, datasets):
    from poc.sql import proto

    args = (*SMALL_WINDOW, "--resume-window-s", "3")
    with Cluster(tmp_path, tenants, datasets["a"], gateway_args=args, with_direct=False,
                 with_connectors=False) as c:
        with TcpProxy(c.tunnel_port) as proxy:
            connector = c.start_connector("tenant_001", url=c.tunnel_url(proxy.port))
            c.wait_online(["tenant_001"])
            token = tenants["tenant_001"].client_token
            with flight.connect(c.flight_uri) as client:
                command = proto.pack_any(proto.CommandStatementQuery("SELECT * FROM sales ORDER BY id"))
                info = client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(token))
                query = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
                first = query.read_chunk().data
                _, dataset, chunk, _ = slow_stream(c, token)
                wait_for(lambda: c.health()["tenants"]["tenant_001"]["streams_in_flight"] == 2)
                connector.popen.kill()  # and it never comes back
                proxy.drop()
                with pytest.raises(flight.FlightUnavailableError, match="disconnected"):
                    read_rest(query, first)  # a query's result cannot be replayed: it fails at once
                started = time.monotonic()
                with pytest.raises(flight.FlightUnavailableError, match="did not come back within --resume-"
                                                                        "window-s 3 s"):
                    read_rest(dataset, chunk)
                waited = time.monotonic() - started
                with pytest.raises(flight.FlightUnavailableError, match="offline"):  # new calls: at once
                    client.get_flight_info(sales(), bearer(token))
            expired = gateway_metric(c, "poc_gateway_streams_resumed_total", outcome="expired")
    assert 1.5 < waited < 15 and expired == 1
