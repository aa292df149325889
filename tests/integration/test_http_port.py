"""The gateway's HTTP port against strangers: framing, deadlines and caps are h11's and poc.http_server's; each
test fails on the hand-written http.server port this replaced."""

from __future__ import annotations

import json
import socket
import time

import pytest

from poc.config import make_tenants
from poc.http_arrow import default_vendor_dir
from poc.workbook.servers.runner import Cluster

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def port(tmp_path_factory, datasets):
    tenants = make_tenants(1)
    args = ("--http-request-deadline-s", str(DEADLINE_S), "--max-http-connections", "6")
    with Cluster(tmp_path_factory.mktemp("http"), tenants, datasets["small"], gateway_args=args,
                 with_direct=False) as cluster:
        yield cluster.gateway.ready["http_port"], tenants["tenant_001"].client_token, cluster


def exchange(port: int, data: bytes, wait_s: float = 3.0) -> bytes:
    """Send `data` on a new connection; everything received until the server closes it or `wait_s` of quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return got
        if not chunk:
            return got
        got += chunk


def statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def test_a_body_is_never_read_as_a_request(port):
    """A GET with a body, and a POST over the size limit, carrying a request for the admin view: the smuggled
    request is never answered (the old port answered it as a second request)."""
    http_port, token, _ = port
    smuggled = b"GET /v1/usage HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = exchange(http_port, b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                   + smuggled)
    assert statuses(raw) == [200] and b"alive" in raw
    big = b'{"sql": "' + b"x" * 200_000 + b'"}'
    raw = exchange(http_port, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                   b"Content-Length: %d\r\n\r\n" % (token.encode(), len(big) + len(smuggled)) + smuggled + big)
    assert statuses(raw) == [413] and b"over the limit" in raw


def test_a_request_dribbled_byte_by_byte_is_cut_at_the_whole_request_deadline(port):
    http_port = port[0]
    request = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sent = 0
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.25)  # each byte well within any per-read timeout
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_until_closed(sock)
    assert statuses(raw) == [408], raw
    assert sent < len(request), "the server waited for the whole dribbled request"
    assert time.monotonic() - started < len(request) * 0.25


def test_connections_past_the_cap_are_answered_503_and_closed(port):
    http_port = port[0]
    held = [socket.create_connection(("127.0.0.1", http_port), timeout=5) for _ in range(6)]
    try:
        time.sleep(0.3)
        raw = exchange(http_port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(raw) == [503] and b"most it takes" in raw
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert statuses(exchange(http_port, b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [200]


@pytest.mark.parametrize("request_bytes, status, text", [
    (b"GET /li\x00vez HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"malformed request"),
    (b"GARBAGE\r\n\r\n", 400, b"malformed request"),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, b"over the limit"),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400,
     b"malformed request"),
    (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\nContent-Length: 40000\r\n\r\n"
     + b"[" * 20_000 + b"]" * 20_000, 400, b"must be JSON"),
], ids=["nul-in-path", "no-request-line", "huge-header", "two-lengths", "nested-json"])
def test_malformed_input_gets_a_status_never_a_dropped_connection_or_a_traceback(port, request_bytes, status, text):
    http_port, token, cluster = port
    raw = exchange(http_port, request_bytes.replace(b"TOKEN", token.encode()))
    assert statuses(raw) == [status], raw[:300]
    assert text in raw
    assert "Traceback" not in cluster.gateway.log_tail(2_000)


def test_no_banner_names_the_server(port):
    raw = exchange(port[0], b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert statuses(raw) == [200] and b"\r\nserver:" not in head and b"python" not in head


def test_page_files_come_only_from_inside_the_listed_packages(port):
    if default_vendor_dir() is None:
        pytest.fail("the page's JavaScript packages are not installed: 'npm ci --prefix ui' (make test does)")
    http_port = port[0]

    def get(path: bytes) -> bytes:
        return exchange(http_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert statuses(get(b"/ui/vendor/tslib/package.json")) == [200]
    for path in (b"/ui/vendor/apache-arrow/../tslib/package.json", b"/ui/vendor/apache-arrow/../../package.json",
                 b"/ui/vendor/tslib/../.package-lock.json", b"/ui/../pyproject.toml"):
        raw = get(path)
        assert statuses(raw) == [404], (path, raw[:200])
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"] == "not a file of the page"
