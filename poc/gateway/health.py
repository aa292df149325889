"""`GET /health` on the HTTP port: each tenant's status, session, last heartbeat and streams in flight."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot
        super().__init__(address, _HealthHandler)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="health-http", daemon=True)
        thread.start()
        return thread


class _HealthHandler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/health":
            self._reply(404, {"error": f"no such path {self.path}; try /health"})
            return
        tenants = self.server.snapshot()
        online = sum(1 for t in tenants.values() if t["status"] == "online")
        self._reply(200, {
            "status": "ok",
            "time": time.time(),
            "tenants_online": online,
            "streams_in_flight": sum(t.get("streams_in_flight", 0) for t in tenants.values()),
            "tenants": tenants,
        })

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # health polls are not worth a log line
        pass
