"""Gateway replicas sharing a real Redis registry: any replica serves any tenant, by forwarding or by location."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from poc.auth import PEER_HEADER, PeerCredentials
from poc.config import make_tenants
from poc.workbook.servers.replicas import LoadLoop, Replicas
from poc.workbook.servers.runner import wait_all_ready
from tests.helpers import bearer, read, sales

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def replicas(tmp_path, tenant_data):
    """Three replicas; tenant_00i's connector dials gw-i and serves a table of its own."""
    tenants = make_tenants(3)  # each connector knows one replica: rebalancing could not move it, so it is off
    with Replicas(tmp_path, tenants, tenant_data, count=3, gateway_args=("--rebalance-s", "0")) as r:
        wait_all_ready([r.connect(tenant, f"gw-{i}", wait=False) for i, tenant in enumerate(tenants, start=1)])
        r.wait_routable(list(tenants))
        yield r


def expected(tenant_data, tenant_id: str = "tenant_001"):
    return pq.read_table(tenant_data[tenant_id] / "sales.parquet")


def tables_of(tenant_data, tenants) -> dict:
    return {tenant: expected(tenant_data, tenant) for tenant in tenants}


def test_every_replica_serves_every_tenant_exactly_to_a_plain_client(replicas, tenant_data):
    for gateway in replicas.gateways:
        for tenant_id, creds in replicas.tenants.items():
            _, got = read(replicas.flight_uri(gateway), creds.client_token)
            assert got.equals(expected(tenant_data, tenant_id)), (gateway, tenant_id)  # its own table, no other
    # gw-1 forwarded the DoGets of the two tenants it does not hold, and counted them
    metrics = scrape(replicas, "gw-1")
    assert metrics[("poc_gateway_forwarded_requests_total", (("method", "do_get"), ("outcome", "ok")))] == 2
    assert metrics[("poc_gateway_registry_up", ())] == 1
    # every replica's tunnels, seen from one (records are rewritten at each renewal, a third of the TTL)
    wait_for(lambda: all(scrape(replicas, "gw-1").get(("poc_gateway_registry_tunnels", (("gateway", g),))) == 1
                         for g in ("gw-1", "gw-2", "gw-3")), 10, "one tunnel per replica in gw-1's metrics")


def test_sql_at_any_replica_runs_at_the_tenants_connector(replicas, tenant_data):
    """ADBC at a replica without the tenant's tunnel: the statement's GetFlightInfo, DoGet, the prepared
    statement's action and the metadata reach the owner (stateless handles: no replica keeps a statement)."""
    from tests.integration.test_sql import connect, local

    sql = "SELECT id % 10 AS k, count(*) AS n FROM sales GROUP BY 1 ORDER BY 1"
    creds = replicas.tenants["tenant_002"]  # its tunnel is on gw-2
    for gateway in ("gw-1", "gw-3"):
        with connect(replicas.flight_uri(gateway), creds.client_token) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            assert cursor.fetch_arrow_table().equals(local(tenant_data["tenant_002"], sql))
            assert conn.adbc_get_table_schema("sales").names == expected(tenant_data).schema.names
    metrics = scrape(replicas, "gw-1")
    assert metrics[("poc_gateway_forwarded_requests_total", (("method", "do_action"), ("outcome", "ok")))] >= 1
    assert metrics[("poc_gateway_forwarded_requests_total", (("method", "do_get"), ("outcome", "ok")))] >= 1


def test_browsers_reach_any_replica_over_http(replicas, tenant_data):
    """The HTTP Arrow endpoints at a replica without the tenant's tunnel: the dataset, the list and a query's
    result come from the owner, forwarded over Flight."""
    from tests.integration.test_browser import http

    creds = replicas.tenants["tenant_002"]  # its tunnel is on gw-2
    port = replicas.gateways["gw-1"].ready["http_port"]
    host = replicas.hosts["gw-1"]
    status, headers, body = http(f"http://{host}:{port}/v1/datasets/sales", creds.client_token)
    assert status == 200 and pa.ipc.open_stream(body).read_all().equals(expected(tenant_data, "tenant_002"))
    assert http(f"http://{host}:{port}/v1/datasets", creds.client_token)[2] == b'{"datasets": ["sales"]}'
    status, _, body = http(f"http://{host}:{port}/v1/query", creds.client_token, {"sql": "SELECT count(*) AS n FROM sales"})
    assert status == 200 and pa.ipc.open_stream(body).read_all()["n"].to_pylist() == [
        expected(tenant_data, "tenant_002").num_rows]


def test_flight_info_names_the_owner_so_clients_can_follow_locations(replicas, tenant_data):
    creds = replicas.tenants["tenant_002"]
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        info = client.get_flight_info(sales(), bearer(creds.client_token))
    [endpoint] = info.endpoints
    owner = replicas.flight_uri("gw-2")
    assert [location.uri.decode() for location in endpoint.locations] == [owner]
    with flight.connect(endpoint.locations[0]) as client:  # a client that follows locations reads from the owner
        got = client.do_get(endpoint.ticket, bearer(creds.client_token)).read_all()
    assert got.equals(expected(tenant_data, "tenant_002"))
    # and the owner served it itself: nothing was forwarded there
    assert ("poc_gateway_forwarded_requests_total", (("method", "do_get"), ("outcome", "ok"))) not in \
        scrape(replicas, "gw-2")


def test_list_flights_and_health_at_any_replica_see_every_tenant(replicas):
    for gateway in replicas.gateways:
        tenants = replicas.health(gateway)["tenants"]
        assert {t: s["status"] for t, s in tenants.items()} == {t: "online" for t in replicas.tenants}
        assert {t: s["gateway"] for t, s in tenants.items()} == {"tenant_001": "gw-1", "tenant_002": "gw-2",
                                                                 "tenant_003": "gw-3"}
        with flight.connect(replicas.flight_uri(gateway)) as client:
            listed = list(client.list_flights(options=bearer(replicas.tenants["tenant_003"].client_token)))
        assert {info.descriptor.path[1] for info in listed} == {b"sales"}


def test_a_forwarded_call_for_a_tunnel_the_owner_no_longer_holds_is_refused_by_epoch(replicas):
    creds = replicas.tenants["tenant_002"]
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        ticket = client.get_flight_info(sales(), bearer(creds.client_token)).endpoints[0].ticket
    epoch = replicas.health("gw-2")["tenants"]["tenant_002"]["epoch"]
    peers = PeerCredentials(replicas.env["POC_PEER_SECRET"].encode())

    def as_peer(epoch: int, gateway: str = "gw-2") -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=[(PEER_HEADER.encode(), peers.make(
            "tenant_002", epoch, gateway, "do_get", ticket.ticket).encode())], timeout=30)
    with flight.connect(replicas.flight_uri("gw-2")) as owner:
        assert owner.do_get(ticket, as_peer(epoch)).read_all().num_rows > 0  # the current epoch is served
        with pytest.raises(flight.FlightUnavailableError, match="stale owner.*epoch 999"):
            owner.do_get(ticket, as_peer(999)).read_all()
        with pytest.raises(flight.FlightUnauthenticatedError, match="another gateway"):
            owner.do_get(ticket, flight.FlightCallOptions(headers=[(PEER_HEADER.encode(), peers.make(
                "tenant_002", epoch, "gw-3", "do_get", ticket.ticket).encode())])).read_all()
        forged = PeerCredentials(b"not-the-peer-secret-of-replicas")
        with pytest.raises(flight.FlightUnauthenticatedError, match="not valid"):
            owner.do_get(ticket, flight.FlightCallOptions(headers=[(PEER_HEADER.encode(), forged.make(
                "tenant_002", epoch, "gw-2", "do_get", ticket.ticket).encode())])).read_all()
    # the connector registers again (new epoch); the old ticket still reads the table through any replica
    replicas.connectors.pop("connector-tenant_002").stop()
    replicas.connect("tenant_002", "gw-3")
    deadline = time.monotonic() + 20
    while replicas.health("gw-1")["tenants"]["tenant_002"].get("epoch", 0) <= epoch:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        assert client.do_get(ticket, bearer(creds.client_token)).read_all().num_rows > 0
    with flight.connect(replicas.flight_uri("gw-3")) as owner:
        with pytest.raises(flight.FlightUnavailableError, match="stale owner"):
            owner.do_get(ticket, as_peer(epoch, "gw-3")).read_all()  # gw-3 holds the new epoch, not the old one


def test_without_redis_replicas_serve_what_they_hold_and_say_why_they_cannot_route(replicas, tenant_data):
    local, remote = replicas.tenants["tenant_001"], replicas.tenants["tenant_002"]
    with LoadLoop(replicas, list(replicas.tenants), through=["gw-1"], readers=2, check_ready=False,
                  tables=tables_of(tenant_data, replicas.tenants)) as load:
        time.sleep(1)
        stopped = time.time()
        replicas.redis.stop()
        _, got = read(replicas.flight_uri("gw-1"), local.client_token)  # its own tunnel: served
        assert got.equals(expected(tenant_data, "tenant_001"))
        with pytest.raises(flight.FlightUnavailableError, match=r"registry \(Redis\) unreachable"):
            read(replicas.flight_uri("gw-1"), remote.client_token)
        status, body = replicas.ready("gw-1")
        assert status == 503 and body["status"] == "registry_unreachable"
        metrics = scrape(replicas, "gw-1")
        assert metrics[("poc_gateway_registry_up", ())] == 0
        assert metrics[("poc_gateway_registry_errors_total", ())] >= 1
        time.sleep(2)
        during = len(load.records)
        # Redis comes back empty (no persistence): each replica publishes its tunnels again, routing resumes
        replicas.redis.start()
        wait_for(lambda: replicas.ready("gw-1")[0] == 200, 30, "gw-1 ready again")
        deadline = time.monotonic() + 30
        for tenant in ("tenant_002", "tenant_003"):  # each replica publishes again at its next renewal
            while True:
                try:
                    _, got = read(replicas.flight_uri("gw-1"), replicas.tenants[tenant].client_token)
                    break
                except flight.FlightUnavailableError:
                    assert time.monotonic() < deadline, replicas.gateways["gw-2"].log_tail()
                    time.sleep(0.2)
            assert got.equals(expected(tenant_data, tenant))
        recovered = time.time()
        time.sleep(2)
    # under load: the local tenant never failed; the others failed only while Redis was away, saying why
    assert not [r for r in load.failed() if r["tenant"] == "tenant_001"], \
        [(round(r["start"] - stopped, 2), r["error"]) for r in load.failed() if r["tenant"] == "tenant_001"][:4]
    assert all("registry (Redis) unreachable" in r["error"] or "registry (Redis) restarted" in r["error"]
               for r in load.failed()), \
        [(round(r["start"] - stopped, 2), r["error"]) for r in load.failed()
         if "registry (Redis)" not in r["error"]][:4]
    assert not [r for r in load.failed() if r["start"] > recovered or r["end"] < stopped], \
        [(r["tenant"], round(r["start"] - recovered, 2), r["error"][:150]) for r in load.failed()
         if r["start"] > recovered or r["end"] < stopped][:4]
    assert not load.short()
    assert len([r for r in load.records if r["start"] > recovered and r["error"] is None]) >= 3
    assert len(load.failed()) >= 1 and during > 5  # the load did run into the outage


def peer_options(replicas: Replicas, tenant: str, epoch: int, gateway: str, method: str, request: bytes,
                 **kwargs) -> flight.FlightCallOptions:
    credentials = PeerCredentials(replicas.env["POC_PEER_SECRET"].encode()).make(tenant, epoch, gateway, method,
                                                                                  request, **kwargs)
    return flight.FlightCallOptions(headers=[(PEER_HEADER.encode(), credentials.encode())], timeout=30)


def test_peer_credentials_serve_one_call_at_one_replica_until_they_expire(replicas):
    """Credentials a replica made to forward one call cannot be replayed for another ticket, another method, a
    tenant the owner does not know, or after they expire."""
    creds = replicas.tenants["tenant_002"]
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        ticket = client.get_flight_info(sales(), bearer(creds.client_token)).endpoints[0].ticket
        other = client.get_flight_info(sales(), bearer(replicas.tenants["tenant_001"].client_token)).endpoints[0].ticket
    epoch = replicas.health("gw-2")["tenants"]["tenant_002"]["epoch"]
    with flight.connect(replicas.flight_uri("gw-2")) as owner:
        good = peer_options(replicas, "tenant_002", epoch, "gw-2", "do_get", ticket.ticket)
        assert owner.do_get(ticket, good).read_all().num_rows > 0
        cases = [
            ("do_get", ticket.ticket, {}, other, "for another request"),  # made for one ticket, shown another
            ("get_flight_info", sales().serialize(), {}, ticket, "for another call"),
            ("do_get", ticket.ticket, {"ttl_s": -1}, ticket, "expired"),
        ]
        for method, request, extra, presented, reason in cases:
            options = peer_options(replicas, "tenant_002", epoch, "gw-2", method, request, **extra)
            with pytest.raises(flight.FlightUnauthenticatedError, match=reason):
                owner.do_get(presented, options).read_all()
        with pytest.raises(flight.FlightUnauthenticatedError, match="does not know"):
            owner.do_get(ticket, peer_options(replicas, "tenant_999", epoch, "gw-2", "do_get", ticket.ticket)).read_all()
        with pytest.raises(flight.FlightUnauthenticatedError, match="another request"):
            owner.get_flight_info(flight.FlightDescriptor.for_path("dataset", "other"),
                                  peer_options(replicas, "tenant_002", epoch, "gw-2", "get_flight_info",
                                               sales().serialize()))


def test_one_tenants_ticket_at_another_replica_with_another_tenants_token_is_refused(replicas):
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        ticket = client.get_flight_info(sales(), bearer(replicas.tenants["tenant_002"].client_token)).endpoints[0].ticket
    with flight.connect(replicas.flight_uri("gw-3")) as client:
        with pytest.raises(flight.FlightUnauthorizedError, match="belongs to another tenant"):
            client.do_get(ticket, bearer(replicas.tenants["tenant_001"].client_token)).read_all()


def test_a_peer_header_at_a_gateway_without_a_registry_is_refused(tmp_path, tenant_data):
    from poc.workbook.servers.runner import Cluster

    tenants = make_tenants(1)
    with Cluster(tmp_path, tenants, tenant_data["tenant_001"], with_direct=False) as cluster:
        peers = PeerCredentials(b"a-secret-this-gateway-never-had")
        with flight.connect(cluster.flight_uri) as client:
            ticket = client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token)).endpoints[0].ticket
            options = flight.FlightCallOptions(headers=[(PEER_HEADER.encode(), peers.make(
                "tenant_001", 1, "gw-1", "do_get", ticket.ticket).encode())], timeout=30)
            with pytest.raises(flight.FlightUnauthenticatedError, match="peer calls are not accepted here"):
                client.do_get(ticket, options).read_all()


class Trap(flight.FlightServerBase):
    """A host that is not a replica: it records every call that reaches it and answers none."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.calls: list[str] = []

    def get_flight_info(self, context, descriptor):
        self.calls.append("get_flight_info")
        raise flight.FlightUnavailableError("trap")

    def do_get(self, context, ticket):
        self.calls.append("do_get")
        raise flight.FlightUnavailableError("trap")

    def list_flights(self, context, criteria):
        self.calls.append("list_flights")
        return iter(())


def write_entries(replicas: Replicas, tenant: str, entries: dict[str, str]) -> None:
    """Raw registry entries (session → text), as whoever can write Redis could write them."""
    import redis

    client = redis.Redis.from_url(replicas.redis.url)
    try:
        for session, text in entries.items():
            client.set(f"poc:tunnel:{tenant}:{session}", text, px=600_000)
            client.sadd(f"poc:tunnels:{tenant}", session)
    finally:
        client.close()


def test_foreign_and_malformed_registry_entries_send_no_call_and_no_client_elsewhere(replicas, tenant_data):
    """Entries for tenant_002 that point at a host no replica advertises (with higher epochs), that are not
    JSON, or that name another tenant: the replicas ignore them, log it, and go on serving from gw-2."""
    from poc.gateway.directory import TunnelEntry

    trap = Trap()
    try:
        trap_uri = f"grpc://127.0.0.1:{trap.port}"
        entries = {f"sess_{i:016x}": TunnelEntry("tenant_002", "gw-9", f"sess_{i:016x}", trap_uri, 100 + i).encode()
                   for i in range(6)}
        entries["sess_00000000000000aa"] = "{not json"
        entries["sess_00000000000000bb"] = TunnelEntry("tenant_001", "gw-1", "sess_00000000000000bb", trap_uri,
                                                       500).encode()
        write_entries(replicas, "tenant_002", entries)
        token = replicas.tenants["tenant_002"].client_token
        for gateway in ("gw-1", "gw-3"):
            for _ in range(4):
                with flight.connect(replicas.flight_uri(gateway)) as client:
                    info = client.get_flight_info(sales(), bearer(token))
                    assert [x.uri.decode() for x in info.endpoints[0].locations] == [replicas.flight_uri("gw-2")]
                    assert client.do_get(info.endpoints[0].ticket, bearer(token)).read_all().equals(
                        expected(tenant_data, "tenant_002"))
                    assert {i.descriptor.path[1] for i in client.list_flights(options=bearer(token))} == {b"sales"}
        assert trap.calls == []
        assert "no replica vouches for" in replicas.gateways["gw-1"].log_tail(5_000)
        assert "a malformed registry entry" in replicas.gateways["gw-1"].log_tail(5_000)
        tunnels = replicas.health("gw-1")["tenants"]["tenant_002"]["tunnels"]
        assert [t["gateway"] for t in tunnels] == ["gw-2"]
    finally:
        trap.shutdown()


def test_with_peer_flight_listed_even_a_forged_replica_record_sends_nothing_elsewhere(tmp_path, tenant_data):
    """`--peer-flight` names the replicas: an attacker who writes both an entry and a replica record for a
    host of theirs (which advertised-location trust would accept) still gets no call."""
    import redis
    from poc.gateway.directory import TunnelEntry

    tenants = make_tenants(2)
    with Replicas(tmp_path, tenants, tenant_data, count=0, gateway_args=("--rebalance-s", "0")) as r:
        ports = {g: r.reserve(g) for g in ("gw-1", "gw-2")}
        peers = [f"grpc://127.0.0.1:{ports[g]['flight_port']}" for g in ports]
        r.gateway_args += [arg for uri in peers for arg in ("--peer-flight", uri)]
        for gateway in ports:
            r.start_gateway(gateway)
        r.connect("tenant_001", "gw-1")
        r.connect("tenant_002", "gw-2")
        r.wait_routable(list(tenants))
        trap = Trap()
        try:
            trap_uri = f"grpc://127.0.0.1:{trap.port}"
            write_entries(r, "tenant_002", {"sess_00000000000000cc": TunnelEntry(
                "tenant_002", "gw-9", "sess_00000000000000cc", trap_uri, 900).encode()})
            client = redis.Redis.from_url(r.redis.url)
            client.set("poc:gateway:gw-9", json.dumps({"id": "gw-9", "flight": trap_uri, "tunnels": 0,
                                                        "at": time.time(), "tunnel": "", "draining": False}), px=600_000)
            client.sadd("poc:gateways", "gw-9")
            client.close()
            token = tenants["tenant_002"].client_token
            for _ in range(6):
                _, got = read(r.flight_uri("gw-1"), token)
                assert got.equals(expected(tenant_data, "tenant_002"))
            assert trap.calls == []
            assert "no replica vouches for" in r.gateways["gw-1"].log_tail(5_000)
        finally:
            trap.shutdown()


def scrape(replicas: Replicas, gateway: str) -> dict:
    port = replicas.gateways[gateway].ready["http_port"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"authorization": f"Bearer {replicas.admin_token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def tunnels_of(replicas: Replicas, tenant_id: str, via: str = "gw-1") -> list[dict]:
    return replicas.health(via)["tenants"][tenant_id].get("tunnels", [])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


@pytest.fixture
def ha(tmp_path, tenant_data):
    """Three replicas; each tenant's connector is given all three and keeps two tunnels."""
    tenants = make_tenants(3)
    with Replicas(tmp_path, tenants, tenant_data, count=3, delay_ms="20") as r:
        wait_all_ready([r.connect(tenant, "gw-1", "gw-2", "gw-3", wait=False) for tenant in tenants])
        for tenant in tenants:
            wait_for(lambda: len(tunnels_of(r, tenant)) == 2, 20, f"{tenant} has two tunnels")
        yield r


def test_a_connector_given_several_replicas_keeps_two_tunnels_on_distinct_ones(ha, tenant_data):
    def on_two(tenant: str) -> bool:
        tunnels = tunnels_of(ha, tenant)
        return (len(tunnels) == 2 and len({t["gateway"] for t in tunnels}) == 2
                and len({t["epoch"] for t in tunnels}) == 2)

    for tenant in ha.tenants:  # while rebalancing moves one, a tenant briefly holds three: the steady state is two
        wait_for(lambda: on_two(tenant), 10, f"{tenant} keeps two tunnels on two replicas")
    # both tunnels of a tenant serve: a replica holding one serves from it, the others forward
    for gateway in ha.gateways:
        for tenant_id, creds in ha.tenants.items():
            _, got = read(ha.flight_uri(gateway), creds.client_token)
            assert got.equals(expected(tenant_data, tenant_id)), (gateway, tenant_id)


def test_sigkill_of_a_replica_under_load_fails_only_its_streams_and_others_serve_within_two_seconds(ha, tenant_data):
    holders = [x["gateway"] for t in ha.tenants for x in tunnels_of(ha, t)]
    victim = max(ha.gateways, key=holders.count)  # the replica holding the most tunnels
    held = [t for t in ha.tenants if any(x["gateway"] == victim for x in tunnels_of(ha, t))]
    survivors = [g for g in ha.gateways if g != victim]
    with LoadLoop(ha, list(ha.tenants), through=survivors, readers=3, tables=tables_of(tenant_data, ha.tenants)) as load:
        time.sleep(2)
        killed_at = time.time()
        ha.kill(victim)
        time.sleep(6)
    late = [r for r in load.failed(since=killed_at + 2)]
    assert not late, [(r['through'], r['tenant'], round(r['start'] - killed_at, 2), r['error']) for r in late[:5]]
    assert not load.short()
    assert len([r for r in load.records if r["start"] > killed_at + 2 and r["error"] is None]) > 10
    # the connectors replaced their lost tunnel on the remaining replica
    for tenant in held:
        wait_for(lambda: len({x["gateway"] for x in tunnels_of(ha, tenant, via=survivors[0])} - {victim}) == 2, 20,
                 f"{tenant} has two live tunnels again")


def test_a_rolling_restart_under_load_fails_no_request(ha, tenant_data):
    with LoadLoop(ha, list(ha.tenants), readers=3, tables=tables_of(tenant_data, ha.tenants)) as load:
        time.sleep(1)
        for gateway in list(ha.gateways):
            ha.restart(gateway)  # SIGTERM: goaway, replacement tunnels elsewhere, in-flight streams finish
            for tenant in ha.tenants:
                wait_for(lambda: len(tunnels_of(ha, tenant, via=gateway)) == 2, 30,
                         f"{tenant} has two tunnels after {gateway} restarted")
        time.sleep(1)
    assert not load.failed(), [(r['through'], r['tenant'], r['error']) for r in load.failed()[:5]]
    assert not load.short()
    assert {r["through"] for r in load.records} == set(ha.gateways) and len(load.records) > 30
    # the replicas told their connectors goaway before they closed, and the connectors moved on it
    told = sum(int(n) for g in ha.gateways
               for n in re.findall(r"goaway sent on (\d+) tunnels", ha.gateways[g].log_tail(10_000)))
    assert told >= 1 and any("says goaway" in c.log_tail(10_000) for c in ha.connectors.values())


def test_a_connectors_two_tunnels_stream_the_same_dataset_at_once_without_mixing_frames(tmp_path, datasets):
    """Both tunnels of one connector send the same frame buffers at once, under socket back-pressure."""
    from concurrent.futures import ThreadPoolExecutor

    tenants = make_tenants(1)
    table = pq.read_table(datasets["a"] / "sales.parquet")
    with Replicas(tmp_path, tenants, datasets["a"], count=2) as r:
        r.connect("tenant_001", "gw-1", "gw-2")
        wait_for(lambda: len(tunnels_of(r, "tenant_001")) == 2, 20, "two tunnels")
        token = tenants["tenant_001"].client_token
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: read(r.flight_uri(f"gw-{i % 2 + 1}"), token)[1], range(32)))
        assert all(got.equals(table) for got in results)
        assert "never opened" not in r.gateways["gw-1"].log_tail(10_000) + r.gateways["gw-2"].log_tail(10_000)


def test_a_flight_tunnel_at_one_replica_serves_clients_of_every_replica(tmp_path, tenant_data):
    """The Flight tunnel (docs/protocol.md §13) registers in the shared registry like any tunnel: clients of the
    replica that holds it and of one that forwards to it read the tenant's exact table."""
    from concurrent.futures import ThreadPoolExecutor

    tenants = make_tenants(1)
    with Replicas(tmp_path, tenants, tenant_data, count=2, gateway_args=("--rebalance-s", "0"), tunnel="flight") as r:
        r.connect("tenant_001", "gw-1")
        wait_for(lambda: [t["gateway"] for t in tunnels_of(r, "tenant_001", via="gw-2")] == ["gw-1"], 20,
                 "one tunnel, at gw-1, seen by gw-2")
        token = tenants["tenant_001"].client_token
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: read(r.flight_uri(f"gw-{i % 2 + 1}"), token)[1], range(8)))
    assert all(got.equals(expected(tenant_data)) for got in results)


def test_a_flight_tunnel_asked_to_move_goes_to_the_flight_tunnel_goaway_prefers(tmp_path, tenant_data):
    """Rebalancing on the Flight tunnel: a replica added later gets a tunnel, and goaway's `prefer` named the new
    replica's Flight tunnel URL (its record's `flight_tunnel`), which the connector dialled; no read fails."""
    tenants = make_tenants(2)
    with Replicas(tmp_path, tenants, tenant_data, count=1, tunnel="flight",
                  gateway_args=("--rebalance-s", "0.5")) as r:
        r.reserve("gw-2")
        for tenant in tenants:
            r.connect(tenant, "gw-1", "gw-2", tunnels=1)
        r.wait_routable(list(tenants))
        with LoadLoop(r, list(tenants), through=["gw-1"], readers=2, tables=tables_of(tenant_data, tenants)) as load:
            r.start_gateway("gw-2")
            wait_for(lambda: sorted(t["gateway"] for tenant in tenants for t in tunnels_of(r, tenant)) == ["gw-1", "gw-2"],
                     60, "one tunnel on each replica")
        assert not load.failed(), [(x["through"], x["tenant"], x["error"]) for x in load.failed()[:5]]
        logs = "".join(c.log_tail(10_000) for c in r.connectors.values())
        assert f"opening a tunnel to {r.tunnel_url('gw-2')}" in logs and r.tunnel_url("gw-2").startswith("flight://")


def test_a_replica_added_under_load_gets_its_share_of_tunnels(tmp_path, tenant_data):
    tenants = make_tenants(6)
    with Replicas(tmp_path, tenants, tenant_data, count=2) as r:
        r.reserve("gw-3")  # its address is known to the connectors before it runs, as a DNS name would be
        for tenant in tenants:
            r.connect(tenant, "gw-1", "gw-2", "gw-3", tunnels=1)
        r.wait_routable(list(tenants))

        def held() -> dict:
            counts = {g: 0 for g in ("gw-1", "gw-2", "gw-3")}
            for state in r.health("gw-1")["tenants"].values():
                for tunnel in state.get("tunnels", [{"gateway": state.get("gateway")}]):
                    counts[tunnel["gateway"]] = counts.get(tunnel["gateway"], 0) + 1
            return counts
        assert held()["gw-3"] == 0
        with LoadLoop(r, list(tenants), through=["gw-1", "gw-2"], readers=2,
                      tables=tables_of(tenant_data, tenants)) as load:
            r.start_gateway("gw-3")
            counts = wait_for(lambda: (lambda c: c if c["gw-3"] >= 2 and sum(c.values()) == 6 else None)(held()),
                              60, "gw-3 gets its share")
        assert counts == {"gw-1": 2, "gw-2": 2, "gw-3": 2} or max(counts.values()) - min(counts.values()) <= 1
        assert not load.failed(), [(x["through"], x["tenant"], x["error"]) for x in load.failed()[:5]]
        assert not load.short()
        moved = r.gateways["gw-1"].log_tail(10_000) + r.gateways["gw-2"].log_tail(10_000)
        assert "asking tenant" in moved and "to move to gw-3" in moved


def test_replicas_with_tls_forward_to_each_other_over_tls(tmp_path, tenant_data):
    from poc.workbook.servers.certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    tenants = make_tenants(2)
    with Replicas(tmp_path, tenants, tenant_data, count=2, tls=pki) as r:
        r.connect("tenant_001", "gw-1")
        r.connect("tenant_002", "gw-2")
        r.wait_routable(list(tenants))
        with flight.connect(r.flight_uri("gw-1"), tls_root_certs=pki.ca.read_bytes()) as client:
            options = bearer(tenants["tenant_002"].client_token)
            info = client.get_flight_info(sales(), options)
            assert info.endpoints[0].locations[0].uri.decode() == r.flight_uri("gw-2")  # grpc+tls://
            got = client.do_get(info.endpoints[0].ticket, options).read_all()  # forwarded over TLS
        assert got.equals(expected(tenant_data, "tenant_002"))
        assert scrape(r, "gw-1")[("poc_gateway_forwarded_requests_total",
                                  (("method", "do_get"), ("outcome", "ok")))] == 1


def test_with_one_tunnel_a_killed_replicas_tenants_come_back_within_ttl_plus_backoff(tmp_path, tenant_data):
    tenants = make_tenants(2)
    with Replicas(tmp_path, tenants, tenant_data, count=2, registry_ttl_s=3.0) as r:
        r.connect("tenant_001", "gw-1", "gw-2", tunnels=1)
        r.wait_routable(["tenant_001"])
        holder = tunnels_of(r, "tenant_001")[0]["gateway"]
        other = "gw-2" if holder == "gw-1" else "gw-1"
        token = tenants["tenant_001"].client_token
        killed = time.monotonic()
        r.kill(holder)

        def served() -> bool:
            try:
                return read(r.flight_uri(other), token)[1].equals(expected(tenant_data, "tenant_001"))
            except flight.FlightUnavailableError:
                return False
        wait_for(served, 3.0 + 5.0, "served through the other replica within TTL + backoff")
        assert time.monotonic() - killed < 3.0 + 5.0


def test_a_connector_given_one_name_for_two_replicas_keeps_a_tunnel_on_each(tmp_path, tenant_data):
    """One --gateway whose name resolves to two addresses (a hosts file of the connector's own, bound over
    /etc/hosts in a mount namespace of its own): a tunnel to each replica, two by default."""
    import socket

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 replicas.test\n127.0.0.2 replicas.test\n")
    with socket.socket() as probe:  # a port free on 127.0.0.1 (and so, almost surely, on 127.0.0.2)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tenants = make_tenants(1)
    with Replicas(tmp_path, tenants, tenant_data, count=0) as r:
        r.start_gateway("gw-1", {"ws_port": port}, host="127.0.0.1")
        r.start_gateway("gw-2", {"ws_port": port}, host="127.0.0.2")
        own_hosts = ("unshare", "--mount", "--", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts))
        r.connect("tenant_001", urls=(f"ws://replicas.test:{port}/connect",), launcher=own_hosts)
        tunnels = wait_for(lambda: (lambda t: t if len(t) == 2 else None)(tunnels_of(r, "tenant_001")), 20,
                           "a tunnel on each replica")
        assert {t["gateway"] for t in tunnels} == {"gw-1", "gw-2"}
        table = expected(tenant_data)
        for gateway in ("gw-1", "gw-2"):
            assert read(r.flight_uri(gateway), tenants["tenant_001"].client_token)[1].equals(table)
        assert "#127.0.0.2" in r.connectors["connector-tenant_001"].log_tail(1000)


# -- a stream cut off with its tunnel, resumed at another replica (docs/protocol.md §6a)

@pytest.mark.parametrize("tunnel", ["websocket", "flight"])
def test_a_stream_cut_off_resumes_at_the_replica_that_holds_the_tenants_tunnel_now(tmp_path, datasets, tunnel):
    """A DoGet at gw-1 read from gw-1's tunnel; that tunnel is cut (and gw-1 stays out of the connector's reach)
    while the stream is half sent; the connector's other tunnel is at gw-2. gw-1 asks gw-2 for the rest, from
    the next row under the same fingerprint: the client gets the exact table, counted once."""
    from poc.workbook.emulation.faults import TcpProxy
    from tests.integration.test_faults import read_rest

    tenants = make_tenants(1)
    table = pq.read_table(datasets["a"] / "sales.parquet")
    args = ("--rebalance-s", "0", "--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
    with Replicas(tmp_path, tenants, datasets["a"], count=2, gateway_args=args, tunnel=tunnel) as r:
        port = int(r.tunnel_url("gw-1").rsplit(":", 1)[1].split("/")[0])
        with TcpProxy(port) as proxy:
            r.connect("tenant_001", urls=(r.tunnel_url("gw-1").replace(f":{port}", f":{proxy.port}"),
                                          r.tunnel_url("gw-2")))
            wait_for(lambda: sorted(t["gateway"] for t in tunnels_of(r, "tenant_001")) == ["gw-1", "gw-2"], 20,
                     "a tunnel at each replica")
            token = tenants["tenant_001"].client_token
            with flight.connect(r.flight_uri("gw-1")) as client:
                info = client.get_flight_info(sales(), bearer(token))
                reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
                first = reader.read_chunk().data
                wait_for(lambda: r.health("gw-1")["tenants"]["tenant_001"].get("streams_in_flight") == 1, 10,
                         "the stream is open at gw-1's tunnel")
                proxy.blackhole()
                proxy.drop()  # gw-1's tunnel is cut mid-stream, and the connector cannot dial gw-1 again
                got = read_rest(reader, first)
            resumed = scrape(r, "gw-1")
            usage_rows = scrape(r, "gw-1").get(("poc_gateway_relayed_rows_total", (("tenant", "tenant_001"),)))
            owner = scrape(r, "gw-2")
    assert got.equals(table)
    assert resumed[("poc_gateway_streams_resumed_total", (("outcome", "resumed"),))] == 1
    assert "resumed from row" in r.gateways["gw-1"].log_tail(20_000)
    # the rows are counted where the client read them, once: the owner served them without counting
    assert usage_rows == table.num_rows
    assert owner.get(("poc_gateway_relayed_rows_total", (("tenant", "tenant_001"),)), 0) == 0


def test_a_resume_ticket_is_refused_from_a_client_and_malformed_ones_from_a_peer(replicas, tenant_data):
    """Only another replica may resume a stream: a client's resume ticket is refused whatever it names, and a
    peer's malformed one is refused too; a peer's good one gets the dataset from that row, while its fingerprint
    is the file's."""
    from poc.gateway.peer_resume import RESUME_TICKET

    creds = replicas.tenants["tenant_001"]  # its tunnel is on gw-1
    good = RESUME_TICKET + b'{"dataset":"sales","from_row":0,"fingerprint":"1-2-3"}'
    with flight.connect(replicas.flight_uri("gw-1")) as client:
        with pytest.raises(flight.FlightUnauthorizedError, match="accepted only from another replica"):
            client.do_get(flight.Ticket(good), bearer(creds.client_token)).read_all()
    epoch = replicas.health("gw-1")["tenants"]["tenant_001"]["epoch"]
    with flight.connect(replicas.flight_uri("gw-1")) as owner:
        for ticket in (RESUME_TICKET + b'{"dataset":"sales","from_row":-1,"fingerprint":"x"}',
                       RESUME_TICKET + b'{"dataset":"sales","from_row":0,"fingerprint":"x","more":1}',
                       RESUME_TICKET + b"not json"):
            options = peer_options(replicas, "tenant_001", epoch, "gw-1", "do_get", ticket)
            with pytest.raises(pa.ArrowInvalid, match="malformed resume ticket"):
                owner.do_get(flight.Ticket(ticket), options).read_all()
        # a well-formed one from a peer is served: the dataset from that row (a wrong fingerprint: refused)
        with pytest.raises(flight.FlightUnavailableError, match="changed since its stream began"):
            owner.do_get(flight.Ticket(good), peer_options(replicas, "tenant_001", epoch, "gw-1", "do_get",
                                                           good)).read_all()
        table = expected(tenant_data)
        stat = (tenant_data["tenant_001"] / "sales.parquet").stat()
        same = RESUME_TICKET + json.dumps({"dataset": "sales", "from_row": 1000, "fingerprint":
                                           f"{stat.st_size}-{stat.st_mtime_ns}-{table.num_rows}"}).encode()
        rest = owner.do_get(flight.Ticket(same), peer_options(replicas, "tenant_001", epoch, "gw-1", "do_get",
                                                              same)).read_all()
    assert rest.equals(table.slice(1000))


def test_a_forwarded_doget_lasts_as_long_as_its_client_reads_not_the_request_timeout(tmp_path, datasets):
    """--request-timeout-s bounds each wait for the connector, not a whole stream: a DoGet forwarded to the owner
    and read for longer than that is not cut off by a deadline on the forwarded call."""
    tenants = make_tenants(1)
    args = ("--rebalance-s", "0", "--request-timeout-s", "2", "--window-bytes", str(2 << 20), "--max-frame-bytes",
            str(1 << 20))
    with Replicas(tmp_path, tenants, datasets["a"], count=2, gateway_args=args) as r:
        r.connect("tenant_001", "gw-2")
        r.wait_routable(["tenant_001"])
        token = tenants["tenant_001"].client_token
        with flight.connect(r.flight_uri("gw-1")) as client:  # gw-1 forwards to gw-2
            info = client.get_flight_info(sales(), bearer(token))
            reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
            batches = [reader.read_chunk().data]
            time.sleep(3.5)  # longer than the request timeout
            got = pa.Table.from_batches(batches + [chunk.data for chunk in reader])
    assert got.equals(pq.read_table(datasets["a"] / "sales.parquet"))
