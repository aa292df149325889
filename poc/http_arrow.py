"""Arrow over HTTP for browsers, which cannot speak Flight's gRPC: the same datasets and SQL as the Flight port,
as `application/vnd.apache.arrow.stream` responses, and the page that reads them into DuckDB-WASM.

- `GET  /v1/datasets`          the tenant's datasets (JSON)
- `GET  /v1/datasets/{name}`   the dataset as an Arrow IPC stream
- `POST /v1/query`             `{"sql": "..."}` → the query's result as an Arrow IPC stream (run at the connector)
- `GET  /ui/…`                 the page (poc/ui/) and the JavaScript packages it needs (npm, served from here)

Every data request needs `authorization: Bearer <client_token>`, as Flight does; the bearer decides the tenant.
The HTTP framing, deadlines and connection cap are poc.http_server's (h11); this module maps requests to tenants
and streams. A stream is written as it arrives, batch by batch, in HTTP/1.1 chunks: the response waits for the
socket, the tunnel stream for the response, so a slow browser slows only its own stream and the gateway buffers
no more than that stream's window (docs/protocol.md §5). A tenant's requests in progress count against its
calls in progress, as its Flight calls do (503 past the cap). A stream that fails after its first byte ends without its final
chunk, which a browser's fetch reports as an error — never as a short table. Errors before the first byte are
JSON with a status: 400 bad request, 401 no or bad token, 403 forbidden, 404 not found, 413 too large, 501 not
supported, 503 tenant offline or unavailable, 504 timeout. CORS answers only the origins configured.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from .auth import REQUEST_ID, TenantAuthMiddleware, TenantCalls
from .errors import CallError
from .flight_errors import for_flight
from .http_server import HttpServer, Request, Response
from .tunnel.messages import valid_dataset_name

log = logging.getLogger("poc.http")

ARROW_STREAM = "application/vnd.apache.arrow.stream"
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream's end-of-stream marker
# A stream that fails after its first byte ends with `POC-ERROR {"status": …, "error": …}` and a newline where the
# next IPC message would start (bytes no Arrow reader takes for one: readers fail rather than stop short), then is
# cut without the final chunk, so any HTTP client sees an error too. A client that asked with `x-stream-errors:
# in-body` gets the body ended cleanly after that line instead: browsers drop the last bytes of a cut response
# (Chromium did, in the page's tests), so the page asks for it to read the reason.
ERROR_CHUNK = b"POC-ERROR "
UI_DIR = Path(__file__).resolve().parent / "ui"
# The npm packages the page loads, served from `vendor_dir` (the project's ui/node_modules, `npm ci --prefix ui`):
# only files inside these folders, resolved, so nothing else of node_modules is reachable.
VENDOR_PACKAGES = ("@duckdb/duckdb-wasm/dist", "apache-arrow", "flatbuffers", "tslib", "vega/build", "vega-lite/build",
                   "vega-embed/build")


ERRORS = ((flight.FlightUnauthenticatedError, 401), (flight.FlightUnauthorizedError, 403),
          (pa.ArrowKeyError, 404), (flight.FlightUnavailableError, 503), (flight.FlightTimedOutError, 504),
          (pa.ArrowInvalid, 400), (pa.ArrowNotImplementedError, 501), (flight.FlightServerError, 502))


def status_of(error: Exception) -> int:
    """The status of a call's error: the project's errors by their Flight kind, as a forwarded call's are."""
    if isinstance(error, CallError):
        error = for_flight(error)
    return next((status for kind, status in ERRORS if isinstance(error, kind)), 500)


def client_error(error: Exception) -> dict:
    """What a client is told of an error: its status and the message, up to Flight's detail, never an internal
    error's text."""
    status = status_of(error)
    return {"status": status, "error": str(error).split(". Detail:")[0][:1024] if status != 500 else "internal error"}


@dataclass
class ArrowHttp:
    """What the HTTP side needs of a server: the tenant behind a bearer token, its datasets, and a stream of a
    dataset or of a query's result (schema and batches). `cors_origins`: origins whose pages may call;
    `calls`: each tenant's calls in progress, shared with the Flight port."""

    tenant_for: Callable[[str], str | None]
    datasets: Callable[[TenantAuthMiddleware], list[str]]
    dataset: Callable[[TenantAuthMiddleware, str], tuple[pa.Schema, Iterator[pa.RecordBatch]]]
    query: Callable[[TenantAuthMiddleware, str], tuple[pa.Schema, Iterator[pa.RecordBatch]]]
    cors_origins: tuple[str, ...] = ()
    vendor_dir: Path | None = None
    calls: TenantCalls | None = None
    size: Callable[[TenantAuthMiddleware, str], int] | None = None  # a dataset's IPC bytes, sent as X-Arrow-Bytes

    def handles(self, path: str) -> bool:
        return path == "/v1/datasets" or path.startswith(("/v1/datasets/", "/v1/query", "/ui"))

    def respond(self, request: Request) -> Response:
        """The response to one request of these paths (in a thread of poc.http_server)."""
        path, method = request.path, request.method
        origin = request.header("origin")
        cors = ({"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                 "Access-Control-Expose-Headers": "x-arrow-bytes, x-request-id"}
                if origin in self.cors_origins else {})
        if method == "OPTIONS":
            if not cors:
                return json_response(403, {"error": f"origin {origin[:200]!r} is not allowed (--cors-origin)"})
            return Response(204, {**cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                  "Access-Control-Allow-Headers": "authorization, content-type, x-request-id, x-stream-errors",
                                  "Access-Control-Max-Age": "600"})
        if path == "/ui" or path.startswith("/ui/"):
            return self._static(path) if method == "GET" else json_response(405, {"error": "GET only"}, cors)
        given = request.header("x-request-id")
        who_id = given if REQUEST_ID.fullmatch(given) else "req_" + secrets.token_hex(8)
        who = None
        try:
            bearer = request.header("authorization")
            tenant = self.tenant_for(bearer[len("Bearer "):]) if bearer.startswith("Bearer ") else None
            if tenant is None:
                raise flight.FlightUnauthenticatedError("this needs 'authorization: Bearer <client_token>'"
                                                        if not bearer else "invalid client token")
            if self.calls is not None:
                self.calls.enter(tenant)  # counted out when the response is over (call_completed)
            who = TenantAuthMiddleware(tenant, who_id, calls=self.calls)
            answer = self._answer(request, who, cors)
        except Exception as exc:  # before the first byte: a status and a message
            if who is not None:
                who.call_completed(exc)
            told = client_error(exc)
            if told["status"] == 500:
                log.error("HTTP %s %s failed", method, path[:200], exc_info=exc)
            return json_response(told["status"], {"error": told["error"], "request_id": who_id}, cors)
        if isinstance(answer, Response):
            who.call_completed(None)
            return answer
        schema, batches, size = answer
        known = {"x-arrow-bytes": str(size)} if size is not None and size >= 0 else {}
        return Response(200, {"Content-Type": ARROW_STREAM, "Cache-Control": "no-store", **cors, **known,
                              "x-request-id": who_id},
                        stream=IpcChunks(schema, batches, who, request.header("x-stream-errors") == "in-body"))

    def _answer(self, request: Request, who: TenantAuthMiddleware, cors: dict):
        """A whole response, or the (schema, batches, its size in bytes or None) of a stream."""
        path, method = request.path, request.method
        if path == "/v1/datasets" and method == "GET":
            return json_response(200, {"datasets": sorted(self.datasets(who))}, cors)
        if path.startswith("/v1/datasets/") and method == "GET":
            name = path[len("/v1/datasets/"):]
            if not valid_dataset_name(name):
                raise pa.ArrowInvalid("a dataset name is 1-128 of A-Z a-z 0-9 _ - . (docs/protocol.md §3a)")
            size = None
            if self.size is not None:
                try:
                    size = self.size(who, name)  # what the page's progress bar counts towards; best effort
                except Exception:
                    size = None
            return (*self.dataset(who, name), size)
        if path == "/v1/query" and method == "POST":
            return (*self.query(who, _sql_from(request)), None)
        return json_response(404 if method in ("GET", "POST") else 405,
                             {"error": "no such path: GET /v1/datasets, GET /v1/datasets/{name}, POST /v1/query"},
                             cors)

    def _static(self, path: str) -> Response:
        """The page's files from poc/ui/, and files inside the listed npm packages' folders under /ui/vendor/."""
        if path in ("/ui", "/ui/"):
            path = "/ui/index.html"
        relative = path[len("/ui/"):]
        if relative.startswith("vendor/"):
            relative = relative[len("vendor/"):]
            package = next((p for p in VENDOR_PACKAGES if relative.startswith(p + "/")), None)
            vendor = self.vendor_dir
            if vendor is None or not (vendor / "@duckdb" / "duckdb-wasm").is_dir():
                return json_response(404, {"error": "the page's JavaScript packages are not installed: run "
                                                    "'npm ci --prefix ui' (make test and make report do)"})
            if package is None:
                return json_response(404, {"error": "not a file of the page"})
            base, root = vendor, (vendor / package).resolve()
        else:
            base = root = UI_DIR.resolve()
        file = (base / relative).resolve() if "\x00" not in relative else root
        if not file.is_file() or root not in file.parents:
            return json_response(404, {"error": "not a file of the page"})
        kind = "application/wasm" if file.suffix == ".wasm" else (
            "text/javascript" if file.suffix in (".js", ".mjs") else mimetypes.guess_type(file.name)[0]
            or "application/octet-stream")
        return Response(200, {"Content-Type": kind, "Cache-Control": "no-cache"}, file.read_bytes())


class IpcChunks:
    """An Arrow IPC stream as the chunks of a response: the schema, each batch, the end-of-stream marker.
    However the response ends — written whole, cut, or never begun — `close()` stops the batches (a tunnel
    stream is cancelled) and counts the call out."""

    def __init__(self, schema: pa.Schema, batches: Iterator[pa.RecordBatch], who: TenantAuthMiddleware,
                 errors_in_body: bool = False) -> None:
        self._parts = self._chunks(schema, batches, errors_in_body)
        self._batches = batches
        self._who = who

    @staticmethod
    def _chunks(schema: pa.Schema, batches: Iterator[pa.RecordBatch], errors_in_body: bool) -> Iterator:
        yield schema.serialize()
        try:
            for batch in batches:
                yield batch.serialize()
        except Exception as exc:
            yield ERROR_CHUNK + json.dumps(client_error(exc)).encode() + b"\n"
            if errors_in_body:
                return  # ended cleanly: the line above is the stream's last word
            raise
        yield EOS

    def __iter__(self) -> "IpcChunks":
        return self

    def __next__(self):
        return next(self._parts)

    def close(self) -> None:
        self._parts.close()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self._who.call_completed(None)


def _sql_from(request: Request) -> str:
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, RecursionError):
        raise pa.ArrowInvalid('the body must be JSON: {"sql": "SELECT ..."}') from None
    if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
        raise pa.ArrowInvalid('the body must be JSON: {"sql": "SELECT ..."}')
    return body["sql"]


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode())


def default_vendor_dir() -> Path | None:
    """The project's ui/node_modules, when the page's packages were installed there."""
    candidate = Path(__file__).resolve().parent.parent / "ui" / "node_modules"
    return candidate if candidate.is_dir() else None


def serve_arrow(address: tuple[str, int], arrow: ArrowHttp) -> HttpServer:
    """An HTTP port serving ArrowHttp only (the direct server's), started."""
    def handle(request: Request) -> Response:
        if arrow.handles(request.path):
            return arrow.respond(request)
        return json_response(404, {"error": "no such path"})

    server = HttpServer(address, handle, name="arrow-http")
    server.start()
    return server
