"""The gateway's HTTP port (poc.http_server): public liveness and readiness, each tenant's status for operators
only, and the browsers' Arrow endpoints and page (poc.http_arrow).

- `GET /livez`  200 while the process serves HTTP; nothing about tenants.
- `GET /readyz` 200 once the Flight server serves, 503 before that and while draining; nothing about tenants.
- `GET /health` the per-tenant view (sessions, heartbeats, streams, datasets, what each holds of the shared
  calls and buffer), only with `authorization: Bearer <admin token>`; 401 without it, 403 when the gateway
  has no admin token.
- `GET /metrics` Prometheus metrics (docs/operations.md), with the admin token: they name tenants.
- `GET /v1/usage` requests, rows and bytes per tenant and dataset since start (JSON, for billing), likewise.
- `POST /v1/tenants/reload` rereads the tenants file, with the admin token.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..http_arrow import ArrowHttp, json_response
from ..http_server import HttpServer, Request, Response
from .metrics import GatewayMetrics

ADMIN_PATHS = ("/health", "/metrics", "/v1/usage")


class HealthServer:
    """The gateway's HTTP port; `start()` serves it from its own thread, `shutdown()` stops it."""

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], dict], state: Callable[[], str],
                 admin_token: str | None, reserved_bytes: Callable[[], int] = lambda: 0,
                 metrics: GatewayMetrics | None = None, reload: Callable[[], dict] | None = None,
                 arrow: ArrowHttp | None = None, **limits) -> None:
        self.arrow = arrow
        self.snapshot = snapshot
        self.reload = reload
        self.metrics = metrics or GatewayMetrics()
        self.reserved_bytes = reserved_bytes
        self.state = state  # "starting", "ready" or "draining"
        self.admin_token = admin_token
        self._http = HttpServer(address, self.respond, name="gateway-http", **limits)

    @property
    def server_address(self) -> tuple[str, int]:
        return self._http.server_address

    def start(self) -> None:
        self._http.start()

    def shutdown(self) -> None:
        self._http.shutdown()

    def respond(self, request: Request) -> Response:
        path, method = request.path, request.method
        if self.arrow is not None and self.arrow.handles(path):
            return self.arrow.respond(request)
        if method == "GET" and path == "/livez":
            return json_response(200, {"status": "alive"})
        if method == "GET" and path == "/readyz":
            state = self.state()
            return json_response(200 if state == "ready" else 503, {"status": state})
        if method == "GET" and path in ADMIN_PATHS:
            return self._admin(request) or self._view(path)
        if method == "POST" and path == "/v1/tenants/reload":
            refused = self._admin(request)
            if refused:
                return refused
            result = self.reload() if self.reload else {"status": "error", "error": "no reload"}
            return json_response(200 if result.get("status") == "ok" else 422, result)
        return json_response(404, {"error": "no such path; try /livez, /readyz, /health, /metrics, /v1/usage or "
                                            "POST /v1/tenants/reload"})

    def _admin(self, request: Request) -> Response | None:
        """None for a request with the admin token; otherwise the 401 (or 403 without one) to answer."""
        expected = self.admin_token
        if not expected:
            return json_response(403, {"error": "per-tenant views are off: the gateway has no admin token"})
        given = request.header("authorization")
        if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {expected}".encode()):
            return json_response(401, {"error": "this view needs 'authorization: Bearer <admin token>'"})
        return None

    def _view(self, path: str) -> Response:
        if path == "/metrics":
            return Response(200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(self.metrics.registry))
        if path == "/v1/usage":
            return json_response(200, self.metrics.usage.snapshot())
        tenants = self.snapshot()
        return json_response(200, {
            "status": self.state(),
            "time": time.time(),
            "tenants_online": sum(1 for t in tenants.values() if t["status"] == "online"),
            "streams_in_flight": sum(t.get("streams_in_flight", 0) for t in tenants.values()),
            "buffer_reserved_bytes": self.reserved_bytes(),
            "tenants": tenants,
        })
