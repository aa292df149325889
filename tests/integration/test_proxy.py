"""The connector behind a corporate proxy: out through a real squid with Basic authentication, HTTP CONNECT on
every transport, a wrong password named with its 407 and backed off, the proxy variables and no_proxy."""

from __future__ import annotations

import re
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.workbook.servers.runner import Cluster
from poc.workbook.servers.squid import Squid
from tests.helpers import bearer, read, sales

TRANSPORTS = {"picows": ("websocket", ("--ws-impl", "picows")), "websockets": ("websocket", ("--ws-impl", "websockets")),
              "flight": ("flight", ())}
PASSWORD = "s3cret:pw@1"  # characters a URL must escape


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, datasets):
    from poc.config import make_tenants

    with Cluster(tmp_path_factory.mktemp("proxy"), make_tenants(1), datasets["small"], with_direct=False,
                 with_connectors=False) as c:
        c.expected = pq.read_table(datasets["small"] / "sales.parquet")
        yield c


@pytest.fixture(scope="module")
def squid(cluster):
    ports = [cluster.gateway.ready["ws_port"], cluster.gateway.ready["flight_tunnel_port"]]
    with Squid(ports, users={"jo": PASSWORD}) as proxy:
        yield proxy


def connector(cluster, transport: str, name: str, extra=(), env=None):
    tunnel, impl = TRANSPORTS[transport]
    return cluster.start_connector("tenant_001", url=cluster.tunnel_url(tunnel=tunnel), extra=(*impl, *extra),
                                   env=env, name=name, wait=False)


def read_through(cluster, started) -> str:
    """Wait for `started` (a connector) to serve, read tenant_001's table through it exactly, stop it; its log."""
    try:
        started.wait_ready(30)
        cluster.wait_online(["tenant_001"])
        _, table = read(cluster.flight_uri, cluster.tenants["tenant_001"].client_token)
        assert table.equals(cluster.expected)
    finally:
        started.stop()
    return started.log_tail(100_000)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_goes_out_through_an_authenticating_proxy(cluster, squid, transport):
    tunnel, _ = TRANSPORTS[transport]
    port = cluster.gateway.ready["ws_port" if tunnel == "websocket" else "flight_tunnel_port"]
    proxied = connector(cluster, transport, f"proxied-{transport}", ("--proxy", f"http://jo@127.0.0.1:{squid.port}"),
                        {"POC_PROXY_PASSWORD": PASSWORD, "https_proxy": "http://127.0.0.1:9", "http_proxy": ""})
    log = read_through(cluster, proxied)
    assert f"through proxy http://jo@127.0.0.1:{squid.port}" in log and "s3cret" not in log
    # squid writes a CONNECT's line when the tunnel closes: the connector's own, as user jo, to the gateway's port
    assert wait_for_line(squid, rf"TCP_TUNNEL/200 \d+ CONNECT 127\.0\.0\.1:{port} jo ")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_password_is_named_with_its_407_and_backed_off(cluster, squid, transport):
    refused = connector(cluster, transport, f"refused-{transport}", ("--proxy", f"http://jo@127.0.0.1:{squid.port}"),
                        {"POC_PROXY_PASSWORD": "not-the-password"})
    try:
        time.sleep(4)
        log = refused.log_tail(100_000)
    finally:
        refused.stop()
    named = re.findall(rf"proxy http://jo@127\.0\.0\.1:{squid.port} refused this connector's credentials "
                       r"\(407 Proxy Authentication Required\)", log)
    assert 2 <= len(named) <= 6, log[-2000:]  # retried with backoff (0.5, 1, 2 s …), not in a tight loop
    assert "reconnecting in" in log and "not-the-password" not in log
    assert "TCP_DENIED/407" in squid.access_log()


def test_the_proxy_variables_are_followed_and_no_proxy_bypasses_them(cluster, squid):
    via_env = f"http://jo:{PASSWORD.replace(':', '%3A').replace('@', '%40')}@127.0.0.1:{squid.port}"
    port = cluster.gateway.ready["flight_tunnel_port"]
    for no_proxy, through in (("", True), ("127.0.0.1", False)):
        before = squid.access_log().count(f"CONNECT 127.0.0.1:{port} jo ")
        log = read_through(cluster, connector(cluster, "flight", f"env-{bool(no_proxy)}", (),
                                              {"https_proxy": via_env, "no_proxy": no_proxy}))
        assert (f"through proxy http://jo@127.0.0.1:{squid.port}" in log) is through
        # squid writes each CONNECT's line when its tunnel closes: one per connection the connector opened
        assert wait_for_line(squid, rf"CONNECT 127\.0\.0\.1:{port} jo ", after=before, timeout=5 if through else 2) \
            is through


def online(cluster: Cluster, wanted: bool, timeout: float = 10) -> bool:
    """Whether tenant_001 is (`wanted` True) or is no longer online within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (cluster.health()["tenants"]["tenant_001"].get("status") == "online") is wanted:
            return True
        time.sleep(0.2)
    return False


def wait_for_line(squid: Squid, pattern: str, after: int = 0, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, squid.access_log())) > after:
            return True
        time.sleep(0.2)
    return False


def test_which_transports_pass_a_tls_inspecting_proxy(tmp_path, datasets):
    """squid bumping TLS (its own certificate for the gateway, signed by the proxy's CA, which the connector is
    given with --ca-file): the WebSocket tunnel passes on both libraries; the Flight tunnel does not, since the
    proxy offers no HTTP/2 (ALPN) inside TLS and gRPC needs it; its connector says so (docs/operations.md)."""
    from poc.config import make_tenants
    from poc.workbook.servers.certs import make_test_pki

    gateway_pki, proxy_pki = make_test_pki(tmp_path / "gateway-pki"), make_test_pki(tmp_path / "proxy-pki")
    tenants = make_tenants(1)
    passed, logs = {}, {}
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False, with_connectors=False, tls=gateway_pki) as c:
        ports = [c.gateway.ready["ws_port"], c.gateway.ready["flight_tunnel_port"]]
        with Squid(ports, bump=(proxy_pki.ca, tmp_path / "proxy-pki" / "ca.key"), upstream_ca=gateway_pki.ca) as squid:
            for transport in TRANSPORTS:
                tunnel, impl = TRANSPORTS[transport]
                url = c.tunnel_url(tunnel=tunnel).replace("127.0.0.1", "localhost")  # a name: the proxy's certificate names it
                proxied = c.start_connector("tenant_001", url=url, name=f"bumped-{transport}",
                                            extra=(*impl, "--proxy", squid.url, "--ca-file", str(proxy_pki.ca)),
                                            wait=False)
                try:
                    passed[transport] = online(c, True)
                    if passed[transport]:
                        with flight.connect(c.flight_uri, tls_root_certs=gateway_pki.ca.read_bytes()) as client:
                            options = bearer(tenants["tenant_001"].client_token)
                            info = client.get_flight_info(sales("sales"), options)
                            table = client.do_get(info.endpoints[0].ticket, options).read_all()
                        assert table.equals(pq.read_table(datasets["small"] / "sales.parquet"))
                finally:
                    proxied.stop()
                    assert online(c, False)
                logs[transport] = proxied.log_tail(100_000)
            bumped = squid.access_log()
    assert passed == {"picows": True, "websockets": True, "flight": False}, passed
    # the proxy saw inside the TLS (inspecting, not tunnelling): the WebSocket upgrades, switched (101)
    assert len(re.findall(r"TCP_TUNNEL/101 \d+ GET https://localhost:\d+/connect ", bumped)) >= 2
    assert "the proxy inspects TLS and does not speak HTTP/2" in logs["flight"]


def behind(cluster: Cluster, squid: Squid, transport: str, extra=()):
    """tenant_001's connector through `squid` with Basic authentication, registered: it and its session id."""
    proxied = connector(cluster, transport, "proxied", ("--proxy", f"http://jo@127.0.0.1:{squid.port}", *extra),
                        {"POC_PROXY_PASSWORD": PASSWORD})
    proxied.wait_ready(30)
    return proxied, cluster.wait_online(["tenant_001"])["tenants"]["tenant_001"]["session_id"]


def paused_doget(cluster: Cluster, client):
    """A DoGet of tenant_001's dataset, its reader (it reads when told to), with a 120 s deadline."""
    token = cluster.tenants["tenant_001"].client_token
    return client.do_get(client.get_flight_info(sales(), bearer(token)).endpoints[0].ticket,
                         bearer(token, timeout=120))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_proxy_restart_during_a_slow_48_mb_doget_gives_the_client_the_exact_table(tmp_path, datasets, transport):
    """The proxy restarts (its tunnels cut) while a 48 MB DoGet is read slowly: the connector comes back through
    it and the stream continues from its next row (docs/protocol.md §6a)."""
    from poc.config import make_tenants

    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
    with Cluster(tmp_path, make_tenants(1), datasets["large"], gateway_args=args, with_direct=False,
                 with_connectors=False) as c:
        ports = [c.gateway.ready["ws_port"], c.gateway.ready["flight_tunnel_port"]]
        with Squid(ports, users={"jo": PASSWORD}) as squid:
            proxied, first = behind(c, squid, transport)
            with flight.connect(c.flight_uri) as client:
                reader = paused_doget(c, client)
                batches = [reader.read_chunk().data]  # then it stops reading a while
                squid.stop()
                squid.start()
                c.wait_online(["tenant_001"], session_not={"tenant_001": first}, timeout=60)
                while True:
                    try:
                        batches.append(reader.read_chunk().data)
                    except StopIteration:
                        break
            log = proxied.log_tail(100_000)
            proxied.stop()
    got = pq.read_table(datasets["large"] / "sales.parquet")
    assert sum(b.num_rows for b in batches) == got.num_rows == 1_000_000
    assert pa.Table.from_batches(batches).equals(got)
    assert re.search(r"do_get sales resumed from row [1-9]\d*", log)


def test_the_flight_tunnels_silent_stream_connection_is_not_cut_by_a_proxys_idle_timeout(tmp_path, datasets):
    """A DoGet whose client stopped reading leaves its data call's connection silent, beside a control call whose
    heartbeats flow on another. Behind squid with a 2 s idle timeout and heartbeats every 1 s, the connector's
    pings keep that connection too: after 6 s of pause nothing was cut, nothing resumed, the table is exact."""
    from poc.config import make_tenants
    from tests.integration.test_faults import gateway_metric

    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
    with Cluster(tmp_path, make_tenants(1), datasets["a"], gateway_args=args, with_direct=False,
                 with_connectors=False) as c:
        ports = [c.gateway.ready["ws_port"], c.gateway.ready["flight_tunnel_port"]]
        with Squid(ports, users={"jo": PASSWORD}, idle_timeout_s=2) as squid:
            proxied, first = behind(c, squid, "flight", ("--heartbeat-s", "1"))
            with flight.connect(c.flight_uri) as client:
                reader = paused_doget(c, client)
                batches = [reader.read_chunk().data]
                time.sleep(6)  # three idle timeouts
                batches += [chunk.data for chunk in reader]
            session = c.health()["tenants"]["tenant_001"]["session_id"]
            resumed = gateway_metric(c, "poc_gateway_streams_resumed_total", outcome="resumed")
            log = c.gateway.log_tail(100_000)
            proxied.stop()
    assert pa.Table.from_batches(batches).equals(pq.read_table(datasets["a"] / "sales.parquet"))
    assert session == first and resumed == 0 and "data call was cut" not in log


def test_a_flight_tunnels_data_call_cut_under_its_live_control_call_resumes_or_fails_at_once(tmp_path, datasets):
    """The Flight tunnel carries each stream on a connection of its own beside the control call's; a proxy may cut
    one and not the other (its idle or lifetime timeout). A dataset's stream then continues from its next row on
    the same link (the client gets the exact table); a query's fails at once with the reason, never short."""
    from poc.config import make_tenants
    from poc.sql import proto
    from poc.workbook.emulation.faults import TcpProxy
    from tests.integration.test_faults import SMALL_WINDOW, gateway_metric, half_sent_behind, read_rest, wait_for

    tenants = make_tenants(1)
    with Cluster(tmp_path, tenants, datasets["a"], gateway_args=SMALL_WINDOW, with_direct=False,
                 with_connectors=False, tunnel="flight") as c:
        with TcpProxy(c.tunnel_port) as proxy:
            session, client, reader, chunk = half_sent_behind(c, proxy, tenants["tenant_001"].client_token)
            proxy.drop(keep=1)  # every connection but the first, the control call's
            got = read_rest(reader, chunk)
            client.close()
            assert c.health()["tenants"]["tenant_001"]["session_id"] == session  # the link itself went on
            resumed = gateway_metric(c, "poc_gateway_streams_resumed_total", outcome="resumed")
            log = c.components["connector-tenant_001"].log_tail(200)

            token = tenants["tenant_001"].client_token
            query = flight.FlightDescriptor.for_command(proto.pack_any(proto.CommandStatementQuery(
                "SELECT * FROM sales ORDER BY id")))
            with flight.connect(c.flight_uri) as client:
                info = client.get_flight_info(query, bearer(token))
                reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
                chunk = reader.read_chunk().data
                wait_for(lambda: c.health()["tenants"]["tenant_001"]["streams_in_flight"] == 1)
                proxy.drop(keep=1)
                with pytest.raises(flight.FlightUnavailableError, match="data call was cut"):
                    read_rest(reader, chunk)
            assert c.health()["tenants"]["tenant_001"]["session_id"] == session
    assert got.equals(pq.read_table(datasets["a"] / "sales.parquet"))
    assert resumed == 1
    assert re.search(r"do_get sales resumed from row [1-9]\d*", log)
