"""The gateway process: WebSocket tunnel endpoint, Flight server and health endpoint, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import signal
import ssl
import time
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .. import config
from ..auth import TicketSigner, flight_certificate
from ..config import TenantCredentials
from ..transports.base import TunnelTransport
from ..transports.websocket import WebSocketLink
from ..tunnel import HEADER, CloseCode, GatewayEndpoint, Limits, TunnelClosed
from ..tunnel.limits import TokenBucket
from ..tunnel.messages import PROTOCOL_VERSION, Register
from .bridge import TunnelBridge
from .flight_server import GatewayFlightServer
from .health import HealthServer
from .link import BufferBudget, TenantLink
from .metrics import GatewayMetrics, close_label
from .registry import TenantRegistry

log = logging.getLogger("poc.gateway")


@dataclass
class GatewayConfig:
    tenants: dict[str, TenantCredentials]
    tenants_file: str | None = None  # reread on SIGHUP and POST /v1/tenants/reload
    host: str = "127.0.0.1"
    ws_port: int = config.WS_PORT
    flight_port: int = config.FLIGHT_PORT
    http_port: int = config.HTTP_PORT
    heartbeat_s: float = config.HEARTBEAT_S
    offline_after_s: float = config.OFFLINE_AFTER_S
    request_timeout_s: float = config.REQUEST_TIMEOUT_S
    register_timeout_s: float = config.REGISTER_TIMEOUT_S
    limits: Limits = field(default_factory=lambda: Limits(config.MAX_FRAME_BYTES, config.WINDOW_BYTES,
                                                          config.MAX_STREAMS, config.MAX_MESSAGE_BYTES))
    max_buffered_bytes: int = config.MAX_BUFFERED_BYTES  # 0: no gateway-wide cap
    ticket_ttl_s: float = config.TICKET_TTL_S
    admin_token: str | None = None  # the per-tenant /health view; off without one
    ticket_secret: bytes | None = None
    max_requests_per_s: float = 0.0  # per tenant link; 0 = unlimited
    shutdown_grace_s: float = 10.0
    ws_impl: str = config.WS_IMPL
    grpc_tunnel_port: int | None = config.GRPC_TUNNEL_PORT  # None: no gRPC tunnel endpoint
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


class Gateway:
    """Start with `await start()`, stop with `await stop()`; ports are known after start."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.registry = TenantRegistry(cfg.tenants)
        self._ws_server: Server | None = None
        self._grpc_server = None
        self._flight: GatewayFlightServer | None = None
        self._http: HealthServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.ports: dict[str, int] = {}
        self.budget = BufferBudget(cfg.max_buffered_bytes)
        self.metrics = self._make_metrics()
        self.state = "starting"  # then "ready", then "draining" (GET /readyz)

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        ssl_context = None
        if cfg.tls:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.ws_impl == "picows":
            from ..transports.picows_ws import serve_picows

            self._ws_server = await serve_picows(self._serve_link, lambda: GatewayEndpoint(cfg.limits), cfg.host,
                                                 cfg.ws_port, ssl_context, cfg.limits.max_frame_bytes + HEADER.size)
            self._stop_accepting = self._ws_server.close
        else:
            self._ws_server = await serve(
                self._handle, cfg.host, cfg.ws_port, process_request=self._only_connect_path, ssl=ssl_context,
                compression=None, max_size=cfg.limits.max_frame_bytes + HEADER.size,
                ping_interval=None, write_limit=1024 * 1024, close_timeout=3)
            self._stop_accepting = lambda: self._ws_server.close(close_connections=False)
        bridge = TunnelBridge(loop, self.registry, cfg.request_timeout_s, self.metrics)
        scheme, tls = ("grpc+tls", [flight_certificate(cfg.tls_cert, cfg.tls_key)]) if cfg.tls else ("grpc", None)
        self._flight = GatewayFlightServer(f"{scheme}://{cfg.host}:{cfg.flight_port}", bridge, cfg.tenants,
                                           TicketSigner(cfg.ticket_secret, cfg.ticket_ttl_s), self.metrics,
                                           tls_certificates=tls)
        # The Flight server already serves once constructed. Its serve() would install signal handlers that
        # shut Flight down before the tunnels, so it is not called: SIGTERM goes to stop() below.
        if cfg.grpc_tunnel_port is not None:
            from ..transports.grpc_tunnel import serve_grpc

            tls_pair = None
            if cfg.tls:
                with open(cfg.tls_cert, "rb") as cert, open(cfg.tls_key, "rb") as key:
                    tls_pair = (cert.read(), key.read())
            self._grpc_server, grpc_port = await serve_grpc(
                self._serve_link, lambda: GatewayEndpoint(cfg.limits), cfg.host, cfg.grpc_tunnel_port,
                cfg.limits.max_frame_bytes + HEADER.size, tls_pair)
        self._http = HealthServer((cfg.host, cfg.http_port), self.registry.snapshot, lambda: self.state,
                                  cfg.admin_token, lambda: self.budget.reserved, self.metrics,
                                  reload=lambda: asyncio.run_coroutine_threadsafe(self._reload(), loop).result(10))
        self._http.start()
        self._spawn(self._watch_heartbeats())
        self.ports = {"ws_port": self._ws_server.sockets[0].getsockname()[1],
                      "flight_port": self._flight.port, "http_port": self._http.server_address[1]}
        if self._grpc_server is not None:
            self.ports["grpc_tunnel_port"] = grpc_port
        self.state = "ready"
        log.info("gateway ready: %s", self.ports)

    async def stop(self) -> None:
        """Stop accepting, let in-flight streams finish for the grace period, end the rest with an error,
        close every tunnel (1001), stop Flight."""
        for task in self._tasks:
            task.cancel()
        self.state = "draining"
        self.registry.draining = True
        if self._ws_server is not None:
            self._stop_accepting()  # open tunnels are closed below, after the grace period
            deadline = time.monotonic() + self.cfg.shutdown_grace_s
            while time.monotonic() < deadline and any(link.streams_in_flight for link in self.registry.links()):
                await asyncio.sleep(0.05)
            for link in self.registry.links():
                self._drop(link, "gateway shutting down", CloseCode.GOING_AWAY)
            await asyncio.wait_for(self._ws_server.wait_closed(), 15)
        if self._grpc_server is not None:
            await self._grpc_server.stop(1.0)
        if self._http is not None:
            self._http.shutdown()
        if self._flight is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._flight.shutdown)

    def reload_tenants(self) -> dict:
        """Reread the tenants file (SIGHUP, POST /v1/tenants/reload); on the event loop. New tenants register
        at once; a removed tenant's tunnel closes with 4006 and its clients are refused; new client tokens
        count from the next call; a new connector token from the next registration (docs/operations.md).
        A file that does not load changes nothing."""
        if not self.cfg.tenants_file:
            return {"status": "error", "error": "the gateway was not started with a tenants file"}
        try:
            new = config.load_tenants(self.cfg.tenants_file)
        except config.ConfigError as exc:
            log.error("tenants file not reloaded, the previous configuration stays in force: %s", exc)
            return {"status": "error", "error": str(exc)}
        old = self.registry.tenants
        kept = new.keys() & old.keys()
        change = {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
                  "client_tokens_rotated": sorted(t for t in kept if new[t].client_token != old[t].client_token),
                  "connector_tokens_rotated": sorted(t for t in kept
                                                     if new[t].connector_token != old[t].connector_token)}
        self.registry.tenants = new
        self._flight.auth.reload(new)
        for link in self.registry.links():
            if link.tenant_id not in new:
                self._drop(link, "tenant removed from the gateway's configuration", CloseCode.TENANT_REMOVED)
        log.info("tenants file reloaded: %d tenants; %s", len(new),
                 ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in change.items() if v) or "no change")
        return {"status": "ok", "tenants": len(new), **change}

    async def _reload(self) -> dict:
        return self.reload_tenants()

    def _make_metrics(self) -> GatewayMetrics:
        """Gauges read their value when scraped, so they never drift from the registry and the budget."""
        metrics = GatewayMetrics()
        for kind in ("picows", "websockets", "grpc"):
            metrics.tunnels.labels(kind).set_function(
                lambda kind=kind: sum(1 for link in self.registry.links() if link.transport.KIND == kind))
        metrics.streams_active.set_function(lambda: sum(link.streams_in_flight for link in self.registry.links()))
        metrics.buffered_bytes.set_function(lambda: self.budget.reserved)
        return metrics

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _only_connect_path(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != "/connect":
            return connection.respond(404, "the tunnel endpoint is /connect\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        await self._serve_link(WebSocketLink(ws, GatewayEndpoint(self.cfg.limits)))

    async def _serve_link(self, transport: TunnelTransport) -> None:
        """One tunnel from its register to its close, whatever transport carries it. However it ends — a
        close, a broken rule, a timeout or a bug — the socket is closed and the link's calls fail."""
        events = transport.events()
        link: TenantLink | None = None
        reason = "closed"
        code: int | None = None  # how the tunnel closed, when known
        close_reason = None  # set: this side must still close the socket, with `code`
        try:
            if self.registry.draining:
                code, close_reason = CloseCode.GOING_AWAY, "gateway shutting down; connect to another gateway"
                return
            async with asyncio.timeout(self.cfg.register_timeout_s):
                first = await anext(events)
            link = await self._register(transport, first[0])
            if link is None:
                return
            async for batch in events:
                for event in batch:
                    link.handle(event)
        except TimeoutError:
            code, close_reason = CloseCode.PROTOCOL_ERROR, f"no register within {self.cfg.register_timeout_s:g} s"
        except TunnelClosed as exc:
            reason, code = str(exc) or reason, exc.code
        except StopAsyncIteration:
            pass
        except Exception:  # a bug on this side: this link ends, the gateway and every other link go on
            log.exception("link of tenant %s failed", link.tenant_id if link else "(unregistered)")
            code, close_reason = 1011, "internal error in the gateway"
        finally:
            await events.aclose()
            if transport.closed is not None and not isinstance(code, int):
                code = transport.closed.code
            self.metrics.tunnel_closes.labels(close_label(code)).inc()
            if close_reason is not None and transport.closed is None:
                reason = close_reason
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.close(code, close_reason), 5)
            if link is not None:
                self.registry.unregister(link)
                link.fail_all(link.closing_reason or reason)
                log.info("tenant %s session %s disconnected: %s", link.tenant_id, link.session_id,
                         link.closing_reason or reason, extra={"tenant": link.tenant_id, "session": link.session_id})

    async def _register(self, transport: TunnelTransport, event) -> TenantLink | None:
        register: Register = event.register  # the core lets nothing else come first
        creds = self.registry.tenants.get(register.tenant_id)
        expected = creds.connector_token if creds else secrets.token_hex(16)
        token_ok = hmac.compare_digest(register.token.encode(), expected.encode()) and creds is not None
        if register.version.split(".")[0] != PROTOCOL_VERSION:
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "unsupported_version",
                                      f"protocol version {register.version!r} is not supported; "
                                      f"this gateway speaks {PROTOCOL_VERSION}", CloseCode.PROTOCOL_ERROR)
        if not token_ok:
            log.warning("refused a connector for tenant %r: invalid token", register.tenant_id)
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "unauthenticated",
                                      f"invalid token for tenant {register.tenant_id!r}", CloseCode.UNAUTHENTICATED)
        session_id = "sess_" + secrets.token_hex(8)
        await transport.call(transport.endpoint.accept, session_id, self.cfg.heartbeat_s)
        link = TenantLink(register.tenant_id, session_id, list(register.datasets), transport, self.budget)
        if self.cfg.max_requests_per_s > 0:
            link.request_rate = TokenBucket(self.cfg.max_requests_per_s)
        link.last_heartbeat = time.time()
        old = self.registry.register(link)
        self.metrics.registrations.labels("ok").inc()
        if old is not None:
            self.metrics.registrations.labels("replaced").inc()
            self._drop(old, f"replaced by a new registration ({session_id})", CloseCode.REPLACED)
        log.info("tenant %s registered: session %s, datasets %s", link.tenant_id, session_id, link.datasets,
                 extra={"tenant": link.tenant_id, "session": session_id})
        return link

    async def _refuse(self, transport: TunnelTransport, code: str, message: str, close_code: int) -> None:
        await transport.call(transport.endpoint.refuse, code, message)
        await transport.close(close_code, message)
        return None

    def _drop(self, link: TenantLink, reason: str, close_code: int) -> None:
        """Take a link out of service now; its requests fail at once, the close completes in the background."""
        link.closing_reason = reason
        self.registry.unregister(link)
        link.fail_all(reason)
        self._spawn(link.transport.close(close_code, reason))

    async def _watch_heartbeats(self) -> None:
        interval = max(0.05, min(5.0, self.cfg.offline_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for link in self.registry.links():
                if now - link.last_seen > self.cfg.offline_after_s:
                    log.warning("tenant %s silent for %.0f s: offline", link.tenant_id, now - link.last_seen)
                    self._drop(link, f"no heartbeat for {self.cfg.offline_after_s:.0f} s", CloseCode.HEARTBEAT_TIMEOUT)


async def run_gateway(cfg: GatewayConfig, stop: asyncio.Event, on_ready=None) -> None:
    """Run until `stop` is set, then shut down cleanly."""
    gateway = Gateway(cfg)
    await gateway.start()
    if cfg.tenants_file:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gateway.reload_tenants)
    if on_ready:
        on_ready(gateway.ports)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
