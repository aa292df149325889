"""The gateway's page in a real Chromium (Debian's, driven by Playwright): a 1,000,000-row dataset streamed from
the tunnel into DuckDB-WASM, SQL in the page, errors shown, and nothing fetched from outside the gateway. The
HTTP Arrow endpoints themselves are checked with plain HTTP clients too."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poc.config import make_tenants
from poc.http_arrow import default_vendor_dir
from poc.workbook.servers.runner import Cluster

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium")
GROUPS = "SELECT id % 10 AS k, count(*) AS n, sum(id) AS s FROM sales GROUP BY 1 ORDER BY 1"


@pytest.fixture(scope="module")
def web(tmp_path_factory, datasets):
    """Tenant 1 serves the 1,000,000-row table, tenant 2 the small one; the page's origin may call. A stream
    whose connector is killed waits 1 s for it, not 30 (docs/protocol.md §6a), before it fails."""
    tenants = make_tenants(2)
    ids = list(tenants)
    with Cluster(tmp_path_factory.mktemp("web"), tenants, datasets["large"], with_connectors=False,
                 gateway_args=("--cors-origin", "http://allowed.example", "--resume-window-s", "1")) as cluster:
        cluster.start_connector(ids[0], data=datasets["large"])
        cluster.start_connector(ids[1], data=datasets["small"])
        cluster.wait_online(ids)
        yield cluster, tenants


def base(cluster) -> str:
    return f"http://127.0.0.1:{cluster.gateway.ready['http_port']}"


def http(url: str, token: str | None = None, body: dict | None = None, headers: dict | None = None,
         method: str | None = None):
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                              **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def relayed_bytes(cluster, tenant_id: str) -> float:
    """The gateway's count of a tenant's bytes handed on to its clients (Flight or HTTP)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{base(cluster)}/metrics",
                                     headers={"Authorization": f"Bearer {cluster.admin_token}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "poc_gateway_relayed_bytes" for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("tenant") == tenant_id)


def local(folder: Path, sql: str) -> pa.Table:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW sales AS SELECT * FROM read_parquet('{folder / 'sales.parquet'}')")
    return con.sql(sql).to_arrow_table()


# -- the endpoints, with plain HTTP


def test_a_dataset_streams_as_arrow_ipc_and_a_query_runs_at_the_connector(web, datasets):
    cluster, tenants = web
    token = tenants["tenant_002"].client_token
    status, headers, body = http(f"{base(cluster)}/v1/datasets/sales", token)
    assert status == 200 and headers["Content-Type"] == "application/vnd.apache.arrow.stream"
    assert pa.ipc.open_stream(body).read_all().equals(pq.read_table(datasets["small"] / "sales.parquet"))
    assert abs(int(headers["x-arrow-bytes"]) - len(body)) <= 64  # the size the page's progress bar counts to
    status, headers, body = http(f"{base(cluster)}/v1/query", token, {"sql": GROUPS})
    assert "x-arrow-bytes" not in headers  # a query's size is not known before it runs
    assert status == 200 and pa.ipc.open_stream(body).read_all().equals(local(datasets["small"], GROUPS))
    direct = f"http://127.0.0.1:{cluster.components['direct'].ready['http_port']}"  # the same endpoint, no tunnel
    assert http(f"{direct}/v1/datasets/sales", token)[0] == 200


@pytest.mark.parametrize("path, token, body, status, text", [
    ("/v1/datasets/sales", None, None, 401, "Bearer"),
    ("/v1/datasets/sales", "wrong", None, 401, "invalid client token"),
    ("/v1/datasets/nope", "t2", None, 404, "not found"),
    ("/v1/datasets/..%2Fetc", "t2", None, 400, "dataset name"),
    ("/v1/query", "t2", {"sql": "SELEC 1"}, 400, "syntax error"),
    ("/v1/query", "t2", {"sql": "SELECT * FROM read_csv('/etc/passwd')"}, 403, "read_csv is not allowed"),
    ("/v1/query", "t2", {"nosql": 1}, 400, "must be JSON"),
    ("/v1/query", "t2", {"sql": "x" * 200_000}, 413, "over the limit"),
    ("/v1/nothing", "t2", None, 404, "no such path"),
], ids=["no-token", "bad-token", "unknown", "bad-name", "syntax", "forbidden", "bad-body", "huge", "path"])
def test_errors_are_json_with_a_status(web, path, token, body, status, text):
    cluster, tenants = web
    token = tenants["tenant_002"].client_token if token == "t2" else token
    got, headers, data = http(base(cluster) + path, token, body)
    assert got == status and headers["Content-Type"] == "application/json"
    assert text in json.loads(data)["error"]


def test_cors_answers_only_configured_origins(web):
    cluster, tenants = web
    url = f"{base(cluster)}/v1/datasets"
    status, headers, _ = http(url, method="OPTIONS", headers={"Origin": "http://allowed.example",
                                                              "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "authorization" in headers["Access-Control-Allow-Headers"]
    assert http(url, method="OPTIONS", headers={"Origin": "http://evil.example"})[0] == 403
    _, headers, _ = http(url, tenants["tenant_002"].client_token, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


def test_a_browser_that_stops_reading_holds_the_gateway_to_its_window(web):
    """A client that reads a few bytes of the 50 MB stream and stops: the gateway buffers at most that stream's
    window; another tenant's stream goes on meanwhile; when the client leaves, the stream is freed."""
    cluster, tenants = web
    port = cluster.gateway.ready["http_port"]
    before = relayed_bytes(cluster, "tenant_001")
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        slow.sendall(f"GET /v1/datasets/sales HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{tenants['tenant_001'].client_token}\r\n\r\n".encode())
        assert b"200 OK" in slow.recv(1024)
        time.sleep(2)
        health = cluster.health()
        assert health["tenants"]["tenant_001"]["streams_in_flight"] == 1
        relayed = relayed_bytes(cluster, "tenant_001") - before
        assert 0 < relayed < 25e6, relayed  # what the socket took, not the 50 MB stream read ahead of it
        status, _, body = http(f"{base(cluster)}/v1/datasets/sales", tenants["tenant_002"].client_token)
        assert status == 200 and pa.ipc.open_stream(body).read_all().num_rows == 20_000
    deadline = time.monotonic() + 15
    while cluster.health()["tenants"]["tenant_001"]["streams_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.health()["tenants"]["tenant_001"]["streams_in_flight"] == 0


# -- the page, in Chromium


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: 'make test' installs it")
    if default_vendor_dir() is None:
        pytest.fail("the page's JavaScript packages are not installed: 'npm ci --prefix ui' (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """The gateway's page, with every request it makes recorded."""

    def __init__(self, browser, cluster) -> None:
        self.origin = base(cluster)
        self.page = browser.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(f"{self.origin}/ui/")
        self.page.wait_for_function("document.body.dataset.state === 'ready'", timeout=30_000)

    def click(self, button: str, timeout_s: float = 120) -> str:
        self.page.click(f"#{button}")
        self.page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=timeout_s * 1000)
        return self.page.evaluate("document.body.dataset.state")

    def text(self, element: str) -> str:
        return self.page.inner_text(f"#{element}")

    def outside(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(self.origin + "/")]


def test_a_million_rows_reach_duckdb_wasm_and_sql_in_the_page_matches_python(web, browser, datasets):
    cluster, tenants = web
    page = Page(browser, cluster)
    try:
        page.page.fill("#token", tenants["tenant_001"].client_token)
        assert page.click("list") == "done" and page.page.input_value("#datasets") == "sales"
        assert page.click("load") == "done", page.text("error")
        assert page.text("rows") == "1000000"
        assert "50.0 MB of 50.0 MB, 1,000,000 rows" in page.text("progress") and " MB/s" in page.text("progress")
        assert page.page.evaluate("[$('bar').value, $('bar').max]".replace("$", "document.getElementById")) == \
            [pytest.approx(50e6, rel=0.01)] * 2
        page.page.fill("#sql", GROUPS)
        assert page.click("run") == "done", page.text("error")
        cells = page.page.eval_on_selector_all("#result tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        expected = local(datasets["large"], GROUPS)
        assert cells[0] == ["k", "n", "s"]
        assert [[int(x) for x in row] for row in cells[1:]] == [list(r.values()) for r in expected.to_pylist()]
        # the chart: Vega-Lite bars of the last number per group, as SVG, its axes titled with the columns' names
        assert page.page.eval_on_selector_all("#chart svg g.mark-rect path", "bars => bars.length") == 10
        assert {"k", "s"} <= set(chart_texts(page))
        page.page.fill("#sql", "SELECT make_date(2026, 1 + id % 12, 1) AS month, count(*) AS n FROM sales "
                               "GROUP BY 1 ORDER BY 1")
        assert page.click("run") == "done", page.text("error")
        assert page.page.eval_on_selector_all("#chart svg g.mark-line path", "lines => lines.length") == 1
        assert {"month", "n"} <= set(chart_texts(page))  # a time column: a line
        page.page.fill("#sql", "SELECT count(*) AS n FROM sales")
        assert page.click("run") == "done", page.text("error")
        assert page.page.eval_on_selector_all("#chart svg", "s => s.length") == 0  # one number: the table alone
        assert page.outside() == [] and len(page.requests) > 5
    finally:
        page.page.close()


WATCH_BAR = """window.seen = [];
new MutationObserver(() => window.seen.push(document.getElementById("bar").value))
  .observe(document.getElementById("progress"), {childList: true, characterData: true, subtree: true});"""


def start_load(page: Page, token: str) -> None:
    """List, then start loading tenant's dataset without waiting; returns once some of it has arrived."""
    page.page.fill("#token", token)
    assert page.click("list") == "done"
    page.page.evaluate(WATCH_BAR)
    page.page.click("#load")
    page.page.wait_for_function("document.getElementById('bar').value > 0", timeout=60_000)


def test_the_progress_bar_moves_and_cancel_stops_the_stream_at_the_gateway(web, browser):
    cluster, tenants = web
    connector = cluster.components["connector-tenant_001"]
    cancels = connector.log_tail(1_000_000).count("cancelled by the gateway")
    page = Page(browser, cluster)
    try:
        start_load(page, tenants["tenant_001"].client_token)
        assert not page.page.is_disabled("#cancel")
        page.page.click("#cancel")
        page.page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=60_000)
        assert page.page.evaluate("document.body.dataset.state") == "error"
        assert page.text("error").startswith("cancelled: the load of sales stopped after")
        seen = page.page.evaluate("window.seen")
        assert len(seen) >= 1 and all(0 < value < 50e6 for value in seen)  # moved, and stopped short
        assert page.page.is_disabled("#cancel")
    finally:
        page.page.close()
    deadline = time.monotonic() + 20  # the gateway cancelled the tunnel stream: the connector heard of it
    while time.monotonic() < deadline and (connector.log_tail(1_000_000).count("cancelled by the gateway") == cancels
                                           or cluster.health()["tenants"]["tenant_001"]["streams_in_flight"]):
        time.sleep(0.2)
    assert connector.log_tail(1_000_000).count("cancelled by the gateway") > cancels
    assert cluster.health()["tenants"]["tenant_001"]["streams_in_flight"] == 0


def test_a_stream_that_fails_midway_ends_with_the_reason_and_is_cut(web, datasets):
    """For any HTTP client: the complete messages, then the gateway's reason as a `POC-ERROR` line where the next
    message would start, then the connection cut without the final chunk: an error for HTTP and for Arrow."""
    import http.client

    cluster, tenants = web
    conn = http.client.HTTPConnection("127.0.0.1", cluster.gateway.ready["http_port"], timeout=60)
    try:
        conn.request("GET", "/v1/datasets/sales", headers={"authorization": f"Bearer {tenants['tenant_001'].client_token}"})
        response = conn.getresponse()
        body = response.read(3_000_000)
        killed = cluster.components["connector-tenant_001"].popen
        killed.kill()
        killed.wait(10)
        with pytest.raises(http.client.IncompleteRead) as cut:
            while piece := response.read1(1 << 16):
                body += piece
        body += cut.value.partial
    finally:
        conn.close()
        cluster.start_connector("tenant_001", data=datasets["large"])
        cluster.wait_online(["tenant_001"])
    head, _, last = body.rpartition(b"POC-ERROR ")
    reason = json.loads(last.decode().rstrip("\n"))
    assert reason["status"] == 503 and "tenant_001" in reason["error"], reason
    with pytest.raises(pa.ArrowInvalid):
        pa.ipc.open_stream(body).read_all()  # never a short table
    assert pa.ipc.open_stream(head).read_next_batch().num_rows > 0  # what came before it was whole messages


def test_a_stream_cut_midway_shows_the_gateways_reason(web, browser, datasets):
    cluster, tenants = web
    page = Page(browser, cluster)
    try:
        start_load(page, tenants["tenant_001"].client_token)
        killed = cluster.components["connector-tenant_001"].popen
        killed.kill()  # the tunnel goes while the stream is under way
        killed.wait(10)
        page.page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=60_000)
        assert page.page.evaluate("document.body.dataset.state") == "error"
        message = page.text("error")
        assert message.startswith("the stream of sales failed after") and "503: " in message, message
        assert "the stream was cut" not in message  # the gateway's own reason, read from its error chunk
    finally:
        page.page.close()
        cluster.start_connector("tenant_001", data=datasets["large"])
        cluster.wait_online(["tenant_001"])


def chart_texts(page: Page) -> list[str]:
    return page.page.eval_on_selector_all("#chart svg text", "texts => texts.map(t => t.textContent)")


def test_the_page_shows_a_wrong_token_and_an_offline_tenant(web, browser, datasets):
    cluster, tenants = web
    page = Page(browser, cluster)
    try:
        page.page.fill("#token", "not-a-token")
        assert page.click("list") == "error" and "401" in page.text("error")
        page.page.fill("#token", tenants["tenant_002"].client_token)
        assert page.click("list") == "done"
        cluster.components["connector-tenant_002"].stop()
        deadline = time.monotonic() + 30
        while cluster.health()["tenants"]["tenant_002"]["status"] == "online" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert page.click("load") == "error"
        assert "503" in page.text("error") and "offline" in page.text("error")
        assert page.outside() == []
    finally:
        page.page.close()
        cluster.start_connector("tenant_002", data=datasets["small"])
        cluster.wait_online(["tenant_002"])


def test_a_connector_that_does_not_answer_in_time_is_a_504(tmp_path, datasets):
    tenants = make_tenants(1)
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=("--request-timeout-s", "1"),
                 with_direct=False) as cluster:
        status, _, body = http(f"{base(cluster)}/v1/query", tenants["tenant_001"].client_token,
                               {"sql": "SELECT sum(i) FROM range(10000000000000) t(i)"})
    assert status == 504, body
    assert "no data from the connector" in json.loads(body)["error"]
