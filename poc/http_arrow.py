"""Arrow over HTTP for browsers, which cannot speak Flight's gRPC: the same datasets and SQL as the Flight port,
as `application/vnd.apache.arrow.stream` responses, and the page that reads them into DuckDB-WASM.

- `GET  /v1/datasets`          the tenant's datasets (JSON)
- `GET  /v1/datasets/{name}`   the dataset as an Arrow IPC stream
- `POST /v1/query`             `{"sql": "..."}` → the query's result as an Arrow IPC stream (run at the connector)
- `GET  /ui/…`                 the page (poc/ui/) and the JavaScript packages it needs (npm, served from here)

Every data request needs `authorization: Bearer <client_token>`, as Flight does; the bearer decides the tenant.
A stream is written as it arrives, batch by batch, in HTTP/1.1 chunks: the response waits for the socket, the
tunnel stream for the response, so a slow browser slows only its own stream and the gateway buffers no more than
that stream's window (docs/protocol.md §5). A stream that fails after its first byte ends without its final
chunk, which a browser's fetch reports as an error — never as a short table. Errors before the first byte are
JSON with a status: 400 bad request, 401 no or bad token, 403 forbidden, 404 not found, 413 too large, 501 not
supported, 503 tenant offline or unavailable, 504 timeout. CORS answers only the origins configured.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from .auth import REQUEST_ID, TenantAuthMiddleware
from .tunnel.messages import valid_dataset_name

log = logging.getLogger("poc.http")

ARROW_STREAM = "application/vnd.apache.arrow.stream"
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream's end-of-stream marker
MAX_BODY_BYTES = 128 * 1024  # a POST /v1/query body
STREAM_WRITE_TIMEOUT_S = 120.0  # a response write that waits longer ends the stream (a browser gone silent)
UI_DIR = Path(__file__).resolve().parent / "ui"
# The npm packages the page loads, served from `vendor_dir` (the project's ui/node_modules, `npm ci --prefix ui`):
# only these folders, so nothing else of node_modules is reachable.
VENDOR_PACKAGES = ("@duckdb/duckdb-wasm/dist", "apache-arrow", "flatbuffers", "tslib")
class _TooLarge(pa.ArrowInvalid):
    """A request body over MAX_BODY_BYTES (413)."""


ERRORS = ((_TooLarge, 413), (flight.FlightUnauthenticatedError, 401), (flight.FlightUnauthorizedError, 403),
          (pa.ArrowKeyError, 404), (flight.FlightUnavailableError, 503), (flight.FlightTimedOutError, 504),
          (pa.ArrowInvalid, 400), (pa.ArrowNotImplementedError, 501), (flight.FlightServerError, 502))


def status_of(error: Exception) -> int:
    return next((status for kind, status in ERRORS if isinstance(error, kind)), 500)


@dataclass
class ArrowHttp:
    """What the HTTP side needs of a server: the tenant behind a bearer token, its datasets, and a stream of a
    dataset or of a query's result (schema and batches). `cors_origins`: origins whose pages may call."""

    tenant_for: Callable[[str], str | None]
    datasets: Callable[[TenantAuthMiddleware], list[str]]
    dataset: Callable[[TenantAuthMiddleware, str], tuple[pa.Schema, Iterator[pa.RecordBatch]]]
    query: Callable[[TenantAuthMiddleware, str], tuple[pa.Schema, Iterator[pa.RecordBatch]]]
    cors_origins: tuple[str, ...] = ()
    vendor_dir: Path | None = None

    def handles(self, path: str) -> bool:
        return path == "/v1/datasets" or path.startswith(("/v1/datasets/", "/v1/query", "/ui"))


def serve(handler: BaseHTTPRequestHandler, arrow: ArrowHttp, method: str) -> None:
    """Answer one request of ArrowHttp's paths on `handler` (an http.server handler speaking HTTP/1.1)."""
    path = handler.path.split("?")[0]
    origin = handler.headers.get("origin")
    cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in arrow.cors_origins else {}
    if method == "OPTIONS":
        if not cors:
            return _json(handler, 403, {"error": f"origin {origin!r} is not allowed (--cors-origin)"}, {})
        return _reply(handler, 204, b"", "text/plain", {
            **cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "authorization, content-type, x-request-id",
            "Access-Control-Max-Age": "600"})
    if path == "/ui" or path.startswith("/ui/"):
        return _static(handler, arrow, path) if method == "GET" else _json(handler, 405, {"error": "GET only"}, cors)
    given = handler.headers.get("x-request-id", "")
    who_id = given if REQUEST_ID.fullmatch(given or "") else "req_" + secrets.token_hex(8)
    try:
        bearer = handler.headers.get("authorization", "")
        tenant = arrow.tenant_for(bearer[len("Bearer "):]) if bearer.startswith("Bearer ") else None
        if tenant is None:
            raise flight.FlightUnauthenticatedError("this needs 'authorization: Bearer <client_token>'"
                                                    if not bearer else "invalid client token")
        who = TenantAuthMiddleware(tenant, who_id)
        if path == "/v1/datasets" and method == "GET":
            return _json(handler, 200, {"datasets": sorted(arrow.datasets(who))}, cors)
        if path.startswith("/v1/datasets/") and method == "GET":
            name = path[len("/v1/datasets/"):]
            if not valid_dataset_name(name):
                raise pa.ArrowInvalid("a dataset name is 1-128 of A-Z a-z 0-9 _ - . (docs/protocol.md §3a)")
            schema, batches = arrow.dataset(who, name)
        elif path == "/v1/query" and method == "POST":
            schema, batches = arrow.query(who, _sql_from(handler))
        else:
            return _json(handler, 404 if method in ("GET", "POST") else 405,
                         {"error": "no such path: GET /v1/datasets, GET /v1/datasets/{name}, POST /v1/query"}, cors)
    except Exception as exc:  # before the first byte: a status and a message
        status = status_of(exc)
        if status == 500:
            log.error("HTTP %s %s failed", method, path, exc_info=exc)
        return _json(handler, status, {"error": str(exc).split(". Detail:")[0][:1024] if status != 500
                                       else "internal error", "request_id": who_id}, cors)
    _stream(handler, schema, batches, {**cors, "x-request-id": who_id})


def _sql_from(handler: BaseHTTPRequestHandler) -> str:
    try:
        length = int(handler.headers.get("content-length", "-1"))
    except ValueError:
        length = -1
    if length < 0:
        raise pa.ArrowInvalid("POST /v1/query needs a content-length")
    if length > MAX_BODY_BYTES:
        raise _TooLarge(f"request body of {length} bytes, over the limit of {MAX_BODY_BYTES}")
    try:
        body = json.loads(handler.rfile.read(length) or b"null")
    except ValueError:
        raise pa.ArrowInvalid('the body must be JSON: {"sql": "SELECT ..."}') from None
    if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
        raise pa.ArrowInvalid('the body must be JSON: {"sql": "SELECT ..."}')
    return body["sql"]


def _stream(handler: BaseHTTPRequestHandler, schema: pa.Schema, batches: Iterator[pa.RecordBatch],
            headers: dict) -> None:
    """The IPC stream in chunks as batches arrive; on a failure after the first byte the connection is cut
    without the final chunk, so the client sees an error, never a complete-looking stream."""
    handler.connection.settimeout(STREAM_WRITE_TIMEOUT_S)  # a browser may read slowly, not stop for minutes
    try:
        handler.send_response(200)
        for name, value in {"Content-Type": ARROW_STREAM, "Transfer-Encoding": "chunked",
                            "Cache-Control": "no-store", **headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        _chunk(handler, schema.serialize())
        for batch in batches:
            _chunk(handler, batch.serialize())
        _chunk(handler, EOS)
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except Exception as exc:
        log.info("HTTP stream ended early: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)  # no final chunk: the client's read fails
        except OSError:
            pass
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # the tunnel stream is cancelled if the client went away before its end


def _chunk(handler: BaseHTTPRequestHandler, data) -> None:
    view = memoryview(data)
    handler.wfile.write(f"{len(view):x}\r\n".encode())
    handler.wfile.write(view)
    handler.wfile.write(b"\r\n")


def _static(handler: BaseHTTPRequestHandler, arrow: ArrowHttp, path: str) -> None:
    """The page's files from poc/ui/, and the allowed npm packages under /ui/vendor/ — nothing else."""
    if path in ("/ui", "/ui/"):
        path = "/ui/index.html"
    relative = path[len("/ui/"):]
    if relative.startswith("vendor/"):
        relative = relative[len("vendor/"):]
        package = next((p for p in VENDOR_PACKAGES if relative.startswith(p + "/")), None)
        root = arrow.vendor_dir
        if root is None or not (root / "@duckdb" / "duckdb-wasm").is_dir():
            return _json(handler, 404, {"error": "the page's JavaScript packages are not installed: run "
                                                 "'npm ci --prefix ui' (make test and make report do)"}, {})
        if package is None:
            return _json(handler, 404, {"error": "not a file of the page"}, {})
    else:
        root = UI_DIR
    file = (root / relative).resolve()
    if not file.is_file() or root.resolve() not in file.parents:
        return _json(handler, 404, {"error": "not a file of the page"}, {})
    kind = "application/wasm" if file.suffix == ".wasm" else (
        "text/javascript" if file.suffix in (".js", ".mjs") else mimetypes.guess_type(file.name)[0]
        or "application/octet-stream")
    _reply(handler, 200, file.read_bytes(), kind, {"Cache-Control": "no-cache"})


def _json(handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict) -> None:
    _reply(handler, status, json.dumps(body).encode(), "application/json", headers)


def _reply(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str, headers: dict) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def default_vendor_dir() -> Path | None:
    """The project's ui/node_modules, when the page's packages were installed there."""
    candidate = Path(__file__).resolve().parent.parent / "ui" / "node_modules"
    return candidate if candidate.is_dir() else None


class ArrowHttpHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (chunked streams, keep-alive) for ArrowHttp's paths; a server's own paths come first."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that sends its request slowly is cut off, not given a thread forever
    server: "ArrowHttpServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        serve(self, self.server.arrow, "GET")

    def do_POST(self) -> None:  # noqa: N802
        serve(self, self.server.arrow, "POST")

    def do_OPTIONS(self) -> None:  # noqa: N802
        serve(self, self.server.arrow, "OPTIONS")

    def log_message(self, format: str, *args) -> None:
        pass


class ArrowHttpServer(ThreadingHTTPServer):
    """The direct server's HTTP port: ArrowHttp only."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], arrow: ArrowHttp) -> None:
        self.arrow = arrow
        super().__init__(address, ArrowHttpHandler)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="arrow-http", daemon=True)
        thread.start()
        return thread
