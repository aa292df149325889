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
from ..auth import PeerCredentials, TenantCalls, TicketSigner, flight_certificate
from ..config import TenantCredentials
from ..transports.base import TunnelTransport, bound_receive_queue
from ..transports.websocket import WebSocketLink
from ..tunnel import HEADER, CloseCode, GatewayEndpoint, Limits, TunnelClosed
from ..tunnel.limits import TokenBucket
from ..tunnel.messages import PROTOCOL_VERSION, Register
from .bridge import TunnelBridge
from .cluster import ClusterRouter
from .directory import RedisDirectory, RegistryUnavailable
from .flight_server import GatewayFlightServer
from .health import HealthServer
from .link import TenantLink
from .shares import BufferBudget
from .metrics import GatewayMetrics, ReplicaTunnels, close_label
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
    limits: Limits = field(default_factory=Limits)  # the tunnel's limits and their defaults (poc.tunnel.limits)
    max_buffered_bytes: int = config.MAX_BUFFERED_BYTES  # 0: no gateway-wide cap
    max_tenant_buffered_bytes: int | None = None  # one tenant's share; None: TENANT_BUFFER_SHARE of the cap
    max_calls_per_tenant: int = config.MAX_CALLS_PER_TENANT  # Flight and HTTP calls in progress; 0: no cap
    max_links_per_tenant: int = config.MAX_LINKS_PER_TENANT  # tunnels of one tenant here; 0: no cap
    max_pending_tunnels: int = config.MAX_PENDING_TUNNELS  # tunnels not registered yet, at once; 0: no cap
    http_max_connections: int = config.HTTP_MAX_CONNECTIONS
    http_request_deadline_s: float = config.HTTP_REQUEST_DEADLINE_S
    ticket_ttl_s: float = config.TICKET_TTL_S
    admin_token: str | None = None  # the per-tenant /health view; off without one
    ticket_secret: bytes | None = None
    max_requests_per_s: float = 0.0  # per tenant link; 0 = unlimited
    shutdown_grace_s: float = 10.0
    ws_impl: str = config.WS_IMPL
    grpc_tunnel_port: int | None = config.GRPC_TUNNEL_PORT  # None: no gRPC tunnel endpoint
    tls_cert: str | None = None
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the HTTP Arrow endpoints (--cors-origin)
    tls_key: str | None = None
    registry_url: str | None = None  # redis://HOST:PORT/DB: replicas sharing one registry; None: in-process
    gateway_id: str = field(default_factory=lambda: "gw-" + secrets.token_hex(4))
    advertise_flight: str | None = None  # this replica's Flight location for clients and peers
    peer_secret: bytes | None = None  # required with a registry: authenticates calls between replicas
    peer_ca_file: str | None = None  # with a registry and TLS: the CA that signed the other replicas' certificates
    peer_flights: tuple[str, ...] = ()  # with a registry: the replicas' Flight locations (--peer-flight); ()
    # trusts each replica's own record for its location
    registry_ttl_s: float = config.REGISTRY_TTL_S
    drain_delay_s: float = 1.0  # with a registry: Flight keeps answering this long after /readyz turns 503
    advertise_tunnel: str | None = None  # this replica's tunnel URL as connectors know it (goaway's `prefer`)
    rebalance_s: float = config.REBALANCE_S  # with a registry: how often to compare load with the others; 0: off
    tunnel_rcvbuf_bytes: int = config.TUNNEL_RCVBUF_BYTES  # receive buffer of near tunnels' sockets; 0: kernel's

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def tenant_buffer_share(self) -> int:
        """What one tenant's streams may reserve (docs/security.md): the option, or a share of the cap."""
        if self.max_tenant_buffered_bytes is not None:
            return self.max_tenant_buffered_bytes
        return int(self.max_buffered_bytes * config.TENANT_BUFFER_SHARE)

    def check(self) -> None:
        """ConfigError when the caps leave a tenant no room: each tenant's share must hold one stream's initial
        window, and what one tenant may hold must leave room for another's."""
        window, cap, share = self.limits.initial_window, self.max_buffered_bytes, self.tenant_buffer_share
        if cap and cap < 2 * window:
            raise config.ConfigError("--max-buffered-bytes must be 0 or at least two streams' initial windows "
                                     f"({2 * window} bytes), so one tenant's streams never fill it")
        if share and share < window:
            raise config.ConfigError(f"--max-tenant-buffered-bytes must be 0 or at least a stream's initial window "
                                     f"({window} bytes)")
        if cap and (not share or share > cap - window):
            raise config.ConfigError("--max-tenant-buffered-bytes must leave room for another tenant's stream: at "
                                     f"most --max-buffered-bytes minus an initial window ({cap - window} bytes)")
        if self.max_calls_per_tenant < 0 or self.max_links_per_tenant < 0:
            raise config.ConfigError("--max-calls-per-tenant and --max-links-per-tenant must be 0 or more")
        if self.http_max_connections < 1 or not self.http_request_deadline_s > 0:
            raise config.ConfigError("--max-http-connections must be at least 1 and --http-request-deadline-s "
                                     "above 0")


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
        self.budget = BufferBudget(cfg.max_buffered_bytes, cfg.tenant_buffer_share)
        self.calls = TenantCalls(cfg.max_calls_per_tenant)
        self.metrics = self._make_metrics()
        self.state = "starting"  # then "ready", then "draining" (GET /readyz)
        self.directory: RedisDirectory | None = None
        self._router: ClusterRouter | None = None
        self._epochs: dict[str, int] = {}  # without a registry: each tenant's registrations, counted here
        self._unregistered = 0  # tunnels open that have not registered yet (--max-pending-tunnels)

    async def start(self) -> None:
        cfg = self.cfg
        loop = self._loop = asyncio.get_running_loop()
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
        scheme, tls = ("grpc+tls", [flight_certificate(cfg.tls_cert, cfg.tls_key)]) if cfg.tls else ("grpc", None)
        peers = PeerCredentials(cfg.peer_secret) if cfg.registry_url else None
        if cfg.registry_url:
            self.directory = RedisDirectory(cfg.registry_url, cfg.gateway_id, "", cfg.registry_ttl_s,
                                            on_error=self.metrics.registry_errors.inc, trusted=cfg.peer_flights)
        bridge = TunnelBridge(loop, self.registry, cfg.request_timeout_s, self.metrics,
                              owner_check=self.directory.confirm if self.directory else None,
                              elsewhere=self._elsewhere)
        self._flight = GatewayFlightServer(f"{scheme}://{cfg.host}:{cfg.flight_port}", bridge, cfg.tenants,
                                           TicketSigner(cfg.ticket_secret, cfg.ticket_ttl_s), self.metrics,
                                           peers=peers, gateway_id=cfg.gateway_id, calls=self.calls,
                                           tls_certificates=tls)
        if self.directory is not None:
            advertise = cfg.advertise_flight or f"{scheme}://{cfg.host}:{self._flight.port}"
            self.directory.flight_location = advertise
            scheme_ws = "wss" if cfg.tls else "ws"
            self.directory.record = {"tunnel": cfg.advertise_tunnel or
                                     f"{scheme_ws}://{cfg.host}:{self._ws_server.sockets[0].getsockname()[1]}/connect",
                                     "draining": False}
            peer_ca = open(cfg.peer_ca_file, "rb").read() if cfg.peer_ca_file else None
            self._router = ClusterRouter(self.directory, peers, bridge.await_on_loop, cfg.request_timeout_s, self.metrics,
                                         peer_ca)
            self._flight.join_cluster(self._router, advertise)
            self.metrics.registry.register(ReplicaTunnels(
                lambda: asyncio.run_coroutine_threadsafe(self.directory.gateways(), loop).result(5)))
            with contextlib.suppress(RegistryUnavailable):
                await self.directory.renew_all()  # this replica's record, before it says it is ready
            self._spawn(self._renew_registry())
            if cfg.rebalance_s > 0:
                self._spawn(self._rebalance())
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
        from ..http_arrow import default_vendor_dir

        self._http = HealthServer((cfg.host, cfg.http_port), self._snapshot, self._readiness,
                                  cfg.admin_token, lambda: self.budget.reserved, self.metrics,
                                  reload=lambda: asyncio.run_coroutine_threadsafe(self._reload(), loop).result(10),
                                  arrow=self._flight.arrow_http(cfg.cors_origins, default_vendor_dir()),
                                  max_connections=cfg.http_max_connections,
                                  request_deadline_s=cfg.http_request_deadline_s)
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
        close every tunnel (1001), stop Flight. With a registry, first drain: goaway to every connector that
        understands it, wait (within the grace period) until each such tenant has a tunnel on another replica,
        then take this replica's entries out of the registry so that calls go elsewhere."""
        for task in self._tasks:
            task.cancel()
        self.state = "draining"
        self.registry.draining = True
        started = time.monotonic()
        deadline = started + self.cfg.shutdown_grace_s
        if self.directory is not None:
            await self._drain(deadline)
            # clients that picked this replica while it was still ready get their answer (forwarded) too
            await asyncio.sleep(max(0.0, min(deadline, started + self.cfg.drain_delay_s) - time.monotonic()))
        if self._ws_server is not None:
            self._stop_accepting()  # open tunnels are closed below, after the grace period
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
        if self._router is not None:
            self._router.close()
        if self.directory is not None:
            await self.directory.close()

    async def _drain(self, deadline: float) -> None:
        """Goaway to every link of a 1.3 connector; wait until their tenants have a tunnel elsewhere (or the
        deadline); then withdraw this replica's entries (in-flight streams go on until they end)."""
        self.directory.record["draining"] = True
        with contextlib.suppress(RegistryUnavailable):
            await self.directory.renew_all()  # the others stop suggesting this replica
        told = [link for link in self.registry.links() if link.connector_id]
        for link in told:
            link.endpoint.goaway("gateway draining; open a tunnel to another gateway")
            link.transport.flush_soon()
        waiting = {link.tenant_id for link in told}
        log.info("draining: goaway sent on %d tunnels of %d tenants", len(told), len(waiting))
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            for tenant in list(waiting):
                try:
                    if await self._elsewhere(tenant):
                        waiting.discard(tenant)
                except RegistryUnavailable:
                    break
        if waiting:
            log.warning("draining: %d tenants have no tunnel on another replica", len(waiting))
        for link in self.registry.links():
            await self.directory.withdraw(link)

    async def _rebalance(self) -> None:
        """Every `rebalance_s`: if this replica holds more than its share of all tunnels (total over the
        replicas that are not draining, rounded up), ask one connector to move: goaway, suggesting the
        least-loaded replica. One at a time, and only links whose connector moves without a gap (1.3: it
        registers elsewhere before it closes this link)."""
        told: dict[str, float] = {}  # session → when it was asked to move
        while True:
            await asyncio.sleep(self.cfg.rebalance_s)
            try:  # replicas that renewed their record lately (a killed one's lingers until its TTL) and stay
                fresh = time.time() - self.cfg.registry_ttl_s * 2 / 3
                records = [r for r in await self.directory.gateways()
                           if not r.get("draining") and r.get("at", 0) >= fresh]
            except RegistryUnavailable:
                continue
            mine = [link for link in self.registry.links() if link.closing_reason is None]
            live = {link.session_id for link in mine}
            told = {s: t for s, t in told.items() if s in live and time.monotonic() - t < 60}
            if len(records) < 2 or self.registry.draining:
                continue
            others = [r for r in records if r.get("id") != self.cfg.gateway_id and r.get("tunnel")]
            total = sum(r.get("tunnels", 0) for r in others) + len(mine)  # its own count as of now
            share = -(-total // (len(others) + 1))
            movable = [link for link in mine if link.connector_id and link.session_id not in told]
            if len(mine) <= share or not others or not movable or told:
                continue  # within its share, or a move still under way
            target = min(others, key=lambda r: r.get("tunnels", 0))
            if target.get("tunnels", 0) + 1 >= len(mine):
                continue  # moving one would not even things out
            link, baseline = None, 0
            for candidate in sorted(movable, key=lambda x: x.streams_in_flight)[:20]:
                try:  # not a tenant with a tunnel there already (its tunnels stay on distinct replicas), nor
                    # one another replica is moving right now (one move per tenant at a time, across replicas)
                    entries = await self.directory.tunnels(candidate.tenant_id)
                    if (all(e.gateway != target["id"] for e in entries)
                            and await self.directory.claim_move(candidate.tenant_id, self.cfg.gateway_id)):
                        link, baseline = candidate, max(e.epoch for e in entries) if entries else 0
                        break
                except RegistryUnavailable:
                    break
            if link is None:
                continue
            told[link.session_id] = time.monotonic()
            log.info("holding %d tunnels, share %d: asking tenant %s to move to %s", len(mine), share,
                     link.tenant_id, target["id"], extra={"tenant": link.tenant_id, "session": link.session_id})
            link.endpoint.goaway(f"rebalancing: {self.cfg.gateway_id} holds more than its share", target["tunnel"])
            link.transport.flush_soon()
            link.moving = True
            self._spawn(self._close_when_moved(link, baseline))

    async def _close_when_moved(self, link: TenantLink, baseline: int, timeout: float = 60.0) -> None:
        """Close a link told goaway once the tenant has a newer tunnel on another replica and nothing is in
        flight on this one (the gateway knows what it sent; the connector closing it could cross a do_get)."""
        deadline = time.monotonic() + timeout
        while link.closing_reason is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                moved = any(e.gateway != self.cfg.gateway_id and e.epoch > baseline  # registered since the goaway
                            for e in await self.directory.tunnels(link.tenant_id))
            except RegistryUnavailable:
                continue
            if moved and link.idle:
                self._drop(link, "moved to another gateway", CloseCode.NORMAL)
                break
        with contextlib.suppress(RegistryUnavailable):
            await self.directory.release_move(link.tenant_id, self.cfg.gateway_id)
        if link.closing_reason is None:
            link.moving = False  # it did not move: serve from it as before

    async def _elsewhere(self, tenant_id: str) -> bool:
        """Whether the tenant has a tunnel on another replica (registry read now)."""
        return any(e.gateway != self.cfg.gateway_id for e in await self.directory.tunnels(tenant_id))

    def _readiness(self) -> str:
        """GET /readyz: "ready" only while the registry (if any) answers: a replica that cannot route sends
        its clients elsewhere."""
        if self.state == "ready" and self.directory is not None and not self.directory.available:
            return "registry_unreachable"
        return self.state

    def _snapshot(self) -> dict:
        """GET /health's tenants (HTTP thread): this gateway's links and, with a registry, every replica's; what
        each tenant holds here of the shared calls and buffer."""
        local = self.registry.snapshot()
        for tenant_id, tenant in local.items():
            tenant["calls_in_progress"] = self.calls.in_progress(tenant_id)
            tenant["buffer_reserved_bytes"] = self.budget.held_by(tenant_id)
        if self.directory is None:
            return local
        for tenant in local.values():
            if tenant["status"] == "online":
                tenant["gateway"] = self.cfg.gateway_id
        loop = self._loop
        try:
            remote = asyncio.run_coroutine_threadsafe(self.directory.all_tunnels(list(local)), loop).result(10)
        except Exception as exc:  # the registry is down: this gateway's view only, and why
            for tenant in local.values():
                if tenant["status"] != "online":
                    tenant["status"] = "unknown"
                    tenant["error"] = str(exc)
            return local
        for tenant_id, entries in remote.items():
            elsewhere = [e for e in entries if e.gateway != self.cfg.gateway_id]
            if local.get(tenant_id, {}).get("status") != "online" and elsewhere:
                newest = max(elsewhere, key=lambda e: e.epoch)
                local[tenant_id] = {"status": "online", "gateway": newest.gateway, "session_id": newest.session,
                                    "epoch": newest.epoch, "flight": newest.flight}
            if entries and tenant_id in local:
                local[tenant_id]["tunnels"] = [{"gateway": e.gateway, "session_id": e.session, "epoch": e.epoch}
                                               for e in entries]
        return local

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
        metrics.registry_up.set_function(lambda: 0 if self.directory is not None and not self.directory.available
                                         else 1)
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
        bound_receive_queue(transport.socket(), self.cfg.tunnel_rcvbuf_bytes)
        events = transport.events()
        link: TenantLink | None = None
        reason = "closed"
        code: int | None = None  # how the tunnel closed, when known
        close_reason = None  # set: this side must still close the socket, with `code`
        self._unregistered += 1  # counted until it registers or ends: strangers hold at most the cap of them
        pending = True
        try:
            if self.registry.draining:
                code, close_reason = CloseCode.GOING_AWAY, "gateway shutting down; connect to another gateway"
                return
            if self.cfg.max_pending_tunnels and self._unregistered > self.cfg.max_pending_tunnels:
                code, close_reason = CloseCode.TRY_AGAIN_LATER, (
                    f"{self.cfg.max_pending_tunnels} tunnels are waiting to register, the most this gateway "
                    "holds; retry later")
                return
            async with asyncio.timeout(self.cfg.register_timeout_s):
                first = await anext(events)
            pending = False
            self._unregistered -= 1
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
            if pending:
                self._unregistered -= 1
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
                self._withdraw(link)
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
        held = [x for x in self.registry.tenant_links(register.tenant_id)
                if x.connector_id != (register.connector_id or "") and x.closing_reason is None]
        if self.cfg.max_links_per_tenant and len(held) >= self.cfg.max_links_per_tenant:
            log.warning("refused a tunnel of tenant %s: it holds %d here, the most allowed", register.tenant_id,
                        len(held), extra={"tenant": register.tenant_id})
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "too_many_links",
                                      f"tenant {register.tenant_id!r} already holds {len(held)} tunnels on this "
                                      "gateway, the most it allows (--max-links-per-tenant); retry later",
                                      CloseCode.TOO_MANY_LINKS)
        session_id = "sess_" + secrets.token_hex(8)
        # `registered` is queued before the link can be routed to, and the link is routable before `registered`
        # is written: a client that calls as soon as its connector is registered finds it, and the requests
        # routed to it leave after `registered` (they queue behind it).
        transport.endpoint.accept(session_id, self.cfg.heartbeat_s)
        link = TenantLink(register.tenant_id, session_id, list(register.datasets), transport, self.budget,
                          connector_id=register.connector_id or "")
        if self.cfg.max_requests_per_s > 0:
            link.request_rate = TokenBucket(self.cfg.max_requests_per_s)
        link.last_heartbeat = time.time()
        if self.directory is not None:
            link.lease_until = 0.0  # not served as owner before the registry has its entry
        else:
            link.epoch = self._epochs[link.tenant_id] = self._epochs.get(link.tenant_id, 0) + 1
        old = self.registry.register(link)
        await transport.call(lambda: None)  # `registered` written
        if self.directory is not None:
            await self.directory.publish(link)
        self.metrics.registrations.labels("ok").inc()
        if old is not None:
            self.metrics.registrations.labels("replaced").inc()
            self._drop(old, f"replaced by a new registration ({session_id})", CloseCode.REPLACED)
        log.info("tenant %s registered: session %s, epoch %d, datasets %s", link.tenant_id, session_id, link.epoch,
                 link.datasets,
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
        self._withdraw(link)
        link.fail_all(reason)
        self._spawn(link.transport.close(close_code, reason))

    def _withdraw(self, link: TenantLink) -> None:
        if self.directory is not None:
            self._spawn(self.directory.withdraw(link))

    async def _renew_registry(self) -> None:
        """Renew this replica's entries every third of the TTL; a tunnel whose entry ran out while it could
        not be renewed (and that Redis no longer holds) is closed with 4007: its connector registers again."""
        while True:
            await asyncio.sleep(self.cfg.registry_ttl_s / 3)
            try:
                lost = await self.directory.renew_all()
            except RegistryUnavailable:
                continue
            for link in lost:
                log.warning("tenant %s session %s: its registry entry ran out; closing the tunnel", link.tenant_id,
                            link.session_id, extra={"tenant": link.tenant_id, "session": link.session_id})
                self._drop(link, "the tunnel's registry entry ran out; register again", CloseCode.LEASE_LOST)

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
