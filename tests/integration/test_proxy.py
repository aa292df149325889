"""The connector behind a corporate proxy: out through a real squid with Basic authentication, HTTP CONNECT on
every transport, a wrong password named with its 407 and backed off, the proxy variables and no_proxy."""

from __future__ import annotations

import re
import time

import pyarrow.parquet as pq
import pytest

from poc.workbook.servers.runner import Cluster
from poc.workbook.servers.squid import Squid
from tests.helpers import read

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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_goes_out_through_an_authenticating_proxy(cluster, squid, transport):
    tunnel, _ = TRANSPORTS[transport]
    port = cluster.gateway.ready["ws_port" if tunnel == "websocket" else "flight_tunnel_port"]
    proxied = connector(cluster, transport, f"proxied-{transport}", ("--proxy", f"http://jo@127.0.0.1:{squid.port}"),
                        {"POC_PROXY_PASSWORD": PASSWORD, "https_proxy": "http://127.0.0.1:9", "http_proxy": ""})
    try:
        proxied.wait_ready(30)
        cluster.wait_online(["tenant_001"])
        _, table = read(cluster.flight_uri, cluster.tenants["tenant_001"].client_token)
        assert table.equals(cluster.expected)
    finally:
        proxied.stop()
    log = proxied.log_tail(100_000)
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
        c = connector(cluster, "flight", f"env-{bool(no_proxy)}", (), {"https_proxy": via_env, "no_proxy": no_proxy})
        try:
            c.wait_ready(30)
            cluster.wait_online(["tenant_001"])
            _, table = read(cluster.flight_uri, cluster.tenants["tenant_001"].client_token)
            assert table.equals(cluster.expected)
        finally:
            c.stop()
        assert (f"through proxy http://jo@127.0.0.1:{squid.port}" in c.log_tail(100_000)) is through
        # squid writes each CONNECT's line when its tunnel closes: one per connection the connector opened
        assert wait_for_line(squid, rf"CONNECT 127\.0\.0\.1:{port} jo ", after=before, timeout=5 if through else 2) \
            is through


def wait_for_line(squid: Squid, pattern: str, after: int = 0, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, squid.access_log())) > after:
            return True
        time.sleep(0.2)
    return False
