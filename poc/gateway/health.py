"""The gateway's HTTP port: public liveness and readiness, and each tenant's status for operators only.

- `GET /livez`  200 while the process serves HTTP; nothing about tenants.
- `GET /readyz` 200 once the Flight server serves, 503 before that and while draining; nothing about tenants.
- `GET /health` the per-tenant view (sessions, heartbeats, streams, datasets), only with
  `authorization: Bearer <admin token>`; 401 without it, 403 when the gateway has no admin token.
- `GET /metrics` Prometheus metrics (docs/operations.md), with the admin token: they name tenants.
- `GET /v1/usage` requests, rows and bytes per tenant and dataset since start (JSON, for billing), likewise.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..http_arrow import ArrowHttp, ArrowHttpHandler, _reply, serve
from .metrics import GatewayMetrics


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], dict], state: Callable[[], str],
                 admin_token: str | None, reserved_bytes: Callable[[], int] = lambda: 0,
                 metrics: GatewayMetrics | None = None, reload: Callable[[], dict] | None = None,
                 arrow: ArrowHttp | None = None) -> None:
        self.arrow = arrow  # the browsers' Arrow endpoints and page (poc.http_arrow)
        self.snapshot = snapshot
        self.reload = reload
        self.metrics = metrics or GatewayMetrics()
        self.reserved_bytes = reserved_bytes
        self.state = state  # "starting", "ready" or "draining"
        self.admin_token = admin_token
        super().__init__(address, _HealthHandler)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="health-http", daemon=True)
        thread.start()
        return thread


class _HealthHandler(ArrowHttpHandler):
    server: HealthServer

    def _arrow(self, method: str) -> bool:
        arrow = self.server.arrow
        if arrow is not None and arrow.handles(self.path.split("?")[0]):
            serve(self, arrow, method)
            return True
        return False

    def do_OPTIONS(self) -> None:  # noqa: N802
        if not self._arrow("OPTIONS"):
            self._reply(404, {"error": "no such path"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if self._arrow("GET"):
            return
        if path == "/livez":
            self._reply(200, {"status": "alive"})
        elif path == "/readyz":
            state = self.server.state()
            self._reply(200 if state == "ready" else 503, {"status": state})
        elif path in ("/health", "/metrics", "/v1/usage") and self._admin():
            if path == "/health":
                self._detailed()
            elif path == "/metrics":
                self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(200, self.server.metrics.usage.snapshot())
        elif path not in ("/health", "/metrics", "/v1/usage"):
            self._reply(404, {"error": "no such path; try /livez, /readyz, /health, /metrics or /v1/usage"})

    def do_POST(self) -> None:  # noqa: N802
        if self._arrow("POST"):
            return
        if self.path.split("?")[0] != "/v1/tenants/reload":
            self._reply(404, {"error": "no such path; POST /v1/tenants/reload"})
        elif self._admin():
            result = self.server.reload() if self.server.reload else {"status": "error", "error": "no reload"}
            self._reply(200 if result.get("status") == "ok" else 422, result)

    def _admin(self) -> bool:
        """True for a request with the admin token; otherwise answers 401 (or 403 without one) and is False."""
        expected = self.server.admin_token
        if not expected:
            self._reply(403, {"error": "per-tenant views are off: the gateway has no admin token"})
            return False
        given = self.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            self._reply(401, {"error": "this view needs 'authorization: Bearer <admin token>'"})
            return False
        return True

    def _detailed(self) -> None:
        tenants = self.server.snapshot()
        online = sum(1 for t in tenants.values() if t["status"] == "online")
        self._reply(200, {
            "status": self.server.state(),
            "time": time.time(),
            "tenants_online": online,
            "streams_in_flight": sum(t.get("streams_in_flight", 0) for t in tenants.values()),
            "buffer_reserved_bytes": self.server.reserved_bytes(),
            "tenants": tenants,
        })

    def _reply(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        _reply(self, status, data, content_type, {})
