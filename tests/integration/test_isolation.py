"""One tenant's worst never slows or refuses another: tenant A holds everything it is allowed to hold, stalled
(its connector takes minutes to answer), and tenant B's GetFlightInfo, DoGet, SQL and HTTP reads all complete
exactly while A holds it. Each cap refuses A with its own reason, at once."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.config import make_tenants
from poc.sql import proto
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, sales

STALL = ("--delay-ms", "600000")  # A's connector answers no DoGet within any test's time
GROUPS = "SELECT id % 10 AS k, count(*) AS n, sum(id) AS s FROM sales GROUP BY 1 ORDER BY 1"  # exact: no float sums


@pytest.fixture
def two(tmp_path, datasets, request):
    """A (stalled) and B (folder 'b', answering at once) behind a gateway with the test's arguments."""
    tenants = make_tenants(2)
    a, b = tenants
    with Cluster(tmp_path, tenants, datasets["b"], gateway_args=request.param, with_connectors=False,
                 with_direct=False) as cluster:
        cluster.start_connector(a, data=datasets["a"], extra=STALL)
        cluster.start_connector(b, data=datasets["b"])
        cluster.wait_online([a, b])
        yield cluster, tenants[a], tenants[b]


@contextlib.contextmanager
def held_do_gets(cluster: Cluster, tenant, count: int, deadline_s: float = 120):
    """`count` DoGets of `tenant` left in progress on threads (its stalled connector never starts them): what
    it holds while the block runs. On leaving, the cluster is stopped and every DoGet has ended (each by its
    own deadline at the latest). Yields the ticket they read."""
    ticket = ticket_of(cluster, tenant.client_token)

    def run():
        try:
            with flight.connect(cluster.flight_uri) as client:
                client.do_get(ticket, bearer(tenant.client_token, timeout=deadline_s)).read_all()
        except flight.FlightError:
            pass  # the deadline, or the cluster stopping

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield ticket
    finally:
        cluster.stop()
        for thread in threads:
            thread.join(15)


def wait_for(cluster: Cluster, tenant: str, key: str, value: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = cluster.health()["tenants"][tenant]
        if view.get(key) == value or time.monotonic() > deadline:
            assert view.get(key) == value, view
            return view
        time.sleep(0.05)


def http_get(cluster: Cluster, path: str, token: str, body: dict | None = None):
    url = f"http://127.0.0.1:{cluster.gateway.ready['http_port']}{path}"
    request = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def local(folder, sql: str) -> pa.Table:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW sales AS SELECT * FROM read_parquet('{folder / 'sales.parquet'}')")
    return con.sql(sql).to_arrow_table()


def b_is_served_exactly(cluster: Cluster, token: str, folder) -> None:
    """Tenant B's GetFlightInfo, DoGet, SQL and HTTP reads, each compared with B's own data."""
    expected = pq.read_table(folder / "sales.parquet")
    with flight.connect(cluster.flight_uri) as client:
        info = client.get_flight_info(sales(), bearer(token))
        assert info.total_records == expected.num_rows
        assert client.do_get(info.endpoints[0].ticket, bearer(token)).read_all().equals(expected)
        command = flight.FlightDescriptor.for_command(proto.pack_any(proto.CommandStatementQuery(GROUPS)))
        ticket = client.get_flight_info(command, bearer(token)).endpoints[0].ticket
        assert client.do_get(ticket, bearer(token)).read_all().equals(local(folder, GROUPS))
    status, body = http_get(cluster, "/v1/datasets/sales", token)
    assert status == 200 and pa.ipc.open_stream(body).read_all().equals(expected)
    status, body = http_get(cluster, "/v1/query", token, {"sql": GROUPS})
    assert status == 200 and pa.ipc.open_stream(body).read_all().equals(local(folder, GROUPS))


def ticket_of(cluster: Cluster, token: str) -> flight.Ticket:
    with flight.connect(cluster.flight_uri) as client:
        return client.get_flight_info(sales(), bearer(token)).endpoints[0].ticket


@pytest.mark.parametrize("two", [("--max-calls-per-tenant", "6")], indirect=True)
def test_a_tenant_holding_all_its_calls_is_refused_and_another_is_served(two, datasets):
    cluster, a, b = two
    with held_do_gets(cluster, a, 6):
        wait_for(cluster, a.tenant_id, "calls_in_progress", 6)
        with flight.connect(cluster.flight_uri) as client:  # A's next call of any kind is refused at once
            with pytest.raises(flight.FlightUnavailableError, match="6 calls in progress"):
                client.get_flight_info(sales(), bearer(a.client_token, timeout=10))
        status, body = http_get(cluster, "/v1/datasets", a.client_token)
        assert status == 503 and "calls in progress" in json.loads(body)["error"]
        b_is_served_exactly(cluster, b.client_token, datasets["b"])
        assert cluster.health()["tenants"][a.tenant_id]["calls_in_progress"] == 6  # held all along


@pytest.mark.parametrize("two", [("--max-buffered-bytes", str(24 << 20), "--max-tenant-buffered-bytes", str(12 << 20),
                                  "--window-bytes", str(8 << 20), "--initial-window-bytes", str(4 << 20),
                                  "--max-frame-bytes", str(1 << 20))], indirect=True)
def test_a_tenant_at_its_buffer_share_is_refused_and_another_streams(two, datasets):
    """A reserves its whole share (three 4 MiB windows of 12 MiB) and is refused the fourth with the reason;
    B then runs three streams at once and reads them exactly: its share is still there."""
    cluster, a, b = two
    with held_do_gets(cluster, a, 3) as ticket:
        assert wait_for(cluster, a.tenant_id, "buffer_reserved_bytes", 12 << 20)["calls_in_progress"] == 3
        with flight.connect(cluster.flight_uri) as client:
            with pytest.raises(flight.FlightUnavailableError, match="share of the gateway's buffer"):
                client.do_get(ticket, bearer(a.client_token, timeout=10)).read_all()
        expected = pq.read_table(datasets["b"] / "sales.parquet")
        results: list = []

        def read():
            with flight.connect(cluster.flight_uri) as client:
                results.append(client.do_get(ticket_of(cluster, b.client_token),
                                             bearer(b.client_token)).read_all())
        readers = [threading.Thread(target=read) for _ in range(3)]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(120)
        assert len(results) == 3 and all(table.equals(expected) for table in results)
        b_is_served_exactly(cluster, b.client_token, datasets["b"])
        assert cluster.health()["tenants"][a.tenant_id]["buffer_reserved_bytes"] == 12 << 20


@pytest.mark.parametrize("two", [()], indirect=True)
def test_with_the_defaults_one_tenant_cannot_take_the_buffer_from_another(two, datasets):
    """The defaults: 2 GiB for the gateway, half for one tenant, 8 MiB initial windows (growing towards
    64 MiB): A's 128 stalled DoGets reserve its 1 GiB share, the 129th is refused, and B is served."""
    cluster, a, b = two
    with held_do_gets(cluster, a, 128) as ticket:
        wait_for(cluster, a.tenant_id, "buffer_reserved_bytes", 1 << 30, timeout=60)
        with flight.connect(cluster.flight_uri) as client:
            with pytest.raises(flight.FlightUnavailableError, match="share of the gateway's buffer"):
                client.do_get(ticket, bearer(a.client_token, timeout=10)).read_all()
        b_is_served_exactly(cluster, b.client_token, datasets["b"])


@pytest.mark.parametrize("two", [("--max-links-per-tenant", "2")], indirect=True)
def test_links_past_the_tenants_cap_are_refused_with_4008_and_the_connector_backs_off(two, datasets):
    cluster, a, b = two  # A's first connector holds one link already
    cluster.start_connector(a.tenant_id, data=datasets["a"], name="a-second", extra=("--connector-id", "second"))
    assert wait_for(cluster, a.tenant_id, "tunnels_here", 2)
    third = cluster.start_connector(a.tenant_id, data=datasets["a"], name="a-third", wait=False,
                                    extra=("--connector-id", "third"))
    deadline = time.monotonic() + 30
    while third.log_tail().count("too_many_links") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    log = third.log_tail(200)
    assert log.count("too_many_links") >= 3, log
    delays = [float(line.split("reconnecting in ")[1].split(" s")[0]) for line in log.splitlines()
              if "reconnecting in" in line]
    assert third.popen.poll() is None and len(delays) >= 3 and delays[-1] > delays[0], delays  # backing off
    assert cluster.health()["tenants"][a.tenant_id]["tunnels_here"] == 2
    b_is_served_exactly(cluster, b.client_token, datasets["b"])


@pytest.mark.parametrize("two", [()], indirect=True)
def test_names_no_connector_serves_leave_no_usage_behind(two, datasets):
    """Usage entries (GET /v1/usage) are made only for datasets a connector served: 300 invented names leave
    nothing, however many a client tries."""
    cluster, a, b = two
    for i in range(300):
        status, _ = http_get(cluster, f"/v1/datasets/no_such_{i}", b.client_token)
        assert status == 404
    b_is_served_exactly(cluster, b.client_token, datasets["b"])
    usage = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{cluster.gateway.ready['http_port']}/v1/usage",
        headers={"Authorization": f"Bearer {cluster.admin_token}"}), timeout=10).read())
    assert set(usage[b.tenant_id]) == {"sales", "(sql)"} and usage[b.tenant_id]["sales"]["requests"] == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("two", [()], indirect=True)
def test_a_pattern_of_many_percent_signs_freezes_nobody(two, datasets):
    """GetDbSchemas and GetTables with 400 `%` signs: a backtracking match held the GIL for hours. The hostile
    calls answer (empty) while B's read runs beside them, and the gateway stays live."""
    cluster, a, b = two
    pattern = "%" * 400 + "x"
    commands = [proto.CommandGetDbSchemas(None, pattern), proto.CommandGetTables(None, pattern, None, (), False),
                proto.CommandGetTables(None, None, pattern, (), False)]
    done: list = []

    def hostile():
        with flight.connect(cluster.flight_uri) as client:
            for command in commands * 3:
                descriptor = flight.FlightDescriptor.for_command(proto.pack_any(command))
                info = client.get_flight_info(descriptor, bearer(a.client_token, timeout=60))
                done.append(client.do_get(info.endpoints[0].ticket, bearer(a.client_token, timeout=60)).read_all())
    thread = threading.Thread(target=hostile)
    thread.start()
    b_is_served_exactly(cluster, b.client_token, datasets["b"])
    thread.join(60)
    assert len(done) == 9 and all(table.num_rows == 0 for table in done)
    assert urllib.request.urlopen(f"http://127.0.0.1:{cluster.gateway.ready['http_port']}/livez",
                                  timeout=10).status == 200
