"""The gateway process wired together: the tunnels (poc.gateway.tunnels), the Flight server and its router
(poc.gateway.flight_server, routing, bridge; with `--registry` cluster and replica), the HTTP port
(poc.gateway.health). Its settings are poc.gateway.settings."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time

import pyarrow.flight as flight

from .. import config
from ..auth import PeerCredentials, TenantCalls, TicketSigner, flight_certificate
from ..http_arrow import default_vendor_dir
from ..tunnel import CloseCode
from .bridge import TunnelBridge
from .cluster import ClusterLinks, ClusterRouter
from .directory import RedisDirectory
from .flight_server import GatewayFlightServer
from .health import HealthServer
from .metrics import GatewayMetrics, ReplicaTunnels
from .peer_resume import PeerResumer
from .registry import TenantRegistry
from .replica import Replica
from .routing import LocalRouter
from .settings import GatewayConfig
from .shares import BufferBudget
from .tunnels import Tunnels

__all__ = ["Gateway", "GatewayConfig", "run_gateway"]

log = logging.getLogger("poc.gateway")


class Gateway:
    """Start with `await start()`, stop with `await stop()`; ports are known after start."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.registry = TenantRegistry(cfg.tenants)
        self.budget = BufferBudget(cfg.max_buffered_bytes, cfg.tenant_buffer_share)
        self.calls = TenantCalls(cfg.max_calls_per_tenant)
        self.metrics = self._make_metrics()
        self.tunnels = Tunnels(cfg, self.registry, self.budget, self.metrics)
        self.state = "starting"  # then "ready", then "draining" (GET /readyz)
        self.replica = None  # poc.gateway.replica.Replica with `--registry`
        self.ports: dict[str, int] = {}
        self._flight: GatewayFlightServer | None = None
        self._http: HealthServer | None = None
        self._router = None  # with `--registry`, its ClusterRouter (closed on stop)

    async def start(self) -> None:
        cfg = self.cfg
        loop = self._loop = asyncio.get_running_loop()
        ssl_context = None
        if cfg.tls:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        await self.tunnels.listen(ssl_context)
        scheme, tls = ("grpc+tls", [flight_certificate(cfg.tls_cert, cfg.tls_key)]) if cfg.tls else ("grpc", None)
        location = f"{scheme}://{cfg.host}:{cfg.flight_port}"
        tickets = TicketSigner(cfg.ticket_secret, cfg.ticket_ttl_s)
        if not cfg.registry_url:  # alone: every call through this gateway's tunnels
            bridge = TunnelBridge(loop, lambda who: self.registry.live(who.tenant_id), cfg.request_timeout_s,
                                  self.metrics)
            self._flight = GatewayFlightServer(location, LocalRouter(bridge, tickets), cfg.tenants, self.metrics,
                                               calls=self.calls, tls_certificates=tls)
        else:
            await self._join_registry(loop, location, tls, tickets)
        # The Flight server already serves once constructed. Its serve() would install signal handlers that
        # shut Flight down before the tunnels, so it is not called: SIGTERM goes to stop() below.
        self._http = HealthServer((cfg.host, cfg.http_port), self._snapshot, self._readiness,
                                  cfg.admin_token, lambda: self.budget.reserved, self.metrics,
                                  reload=lambda: asyncio.run_coroutine_threadsafe(self._reload(), loop).result(10),
                                  arrow=self._flight.arrow_http(cfg.cors_origins, default_vendor_dir()),
                                  max_connections=cfg.http_max_connections,
                                  request_deadline_s=cfg.http_request_deadline_s)
        self._http.start()
        self.ports = {**self.tunnels.ports, "flight_port": self._flight.port,
                      "http_port": self._http.server_address[1]}
        self.state = "ready"
        log.info("gateway ready: %s", self.ports)

    async def stop(self) -> None:
        """Stop accepting, let in-flight streams finish for the grace period, end the rest with an error,
        close every tunnel (1001), stop Flight. With a registry, first drain: goaway to every connector that
        understands it, wait (within the grace period) until each such tenant has a tunnel on another replica,
        then take this replica's entries out of the registry so that calls go elsewhere."""
        self.state = "draining"
        self.registry.draining = True
        started = time.monotonic()
        deadline = started + self.cfg.shutdown_grace_s
        if self.replica is not None:
            await self.replica.stop(deadline, started)
        await self.tunnels.close(deadline)
        if self._http is not None:
            self._http.shutdown()
        if self._flight is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._flight.shutdown)
        if self._router is not None:
            self._router.close()
        if self.replica is not None:
            await self.replica.close()

    async def _join_registry(self, loop, location: str, tls, tickets: TicketSigner) -> None:
        """`--registry`: the Flight server routes through a ClusterRouter; this replica publishes its tunnels and
        its record (poc.gateway.replica) before it says it is ready."""
        cfg = self.cfg
        peers = PeerCredentials(cfg.peer_secret)
        directory = RedisDirectory(cfg.registry_url, cfg.gateway_id, "", cfg.registry_ttl_s,
                                   on_error=self.metrics.registry_errors.inc, trusted=cfg.peer_flights)
        links = ClusterLinks(self.registry, directory)
        bridge = TunnelBridge(loop, links.pick, cfg.request_timeout_s, self.metrics)
        local = LocalRouter(bridge, tickets)
        self._flight = GatewayFlightServer(location, local, cfg.tenants, self.metrics, peers=peers,
                                           gateway_id=cfg.gateway_id, calls=self.calls, tls_certificates=tls)
        advertise = cfg.advertise_flight or f"{location.rsplit(':', 1)[0]}:{self._flight.port}"
        directory.flight_location = advertise
        local.set_locations([flight.Location(advertise)])
        directory.record = {"tunnel": cfg.advertise_tunnel or
                            f"{'wss' if cfg.tls else 'ws'}://{cfg.host}:{self.tunnels.ports['ws_port']}/connect",
                            "draining": False}
        if "flight_tunnel_port" in self.tunnels.ports:
            directory.record["flight_tunnel"] = cfg.advertise_flight_tunnel or (
                f"{'flight+tls' if cfg.tls else 'flight'}://{cfg.host}:{self.tunnels.ports['flight_tunnel_port']}")
        peer_ca = open(cfg.peer_ca_file, "rb").read() if cfg.peer_ca_file else None
        self._router = ClusterRouter(local, directory, peers, bridge.await_on_loop, cfg.request_timeout_s,
                                     self.metrics, peer_ca)
        self._flight.router = self._router
        self.tunnels.peers = PeerResumer(self._router, loop)
        self.metrics.registry_up.set_function(lambda: 1 if directory.available else 0)
        self.metrics.registry.register(ReplicaTunnels(
            lambda: asyncio.run_coroutine_threadsafe(directory.gateways(), loop).result(5)))
        self.replica = self.tunnels.replica = Replica(directory, self.registry, links, self.tunnels.drop,
                                                      cfg.registry_ttl_s, cfg.rebalance_s, cfg.drain_delay_s)
        await self.replica.start()

    def _readiness(self) -> str:
        """GET /readyz: the gateway's state; with replicas, "registry_unreachable" while it cannot route."""
        return self.replica.readiness(self.state) if self.replica is not None else self.state

    def _snapshot(self) -> dict:
        """GET /health's tenants (HTTP thread): this gateway's links and, with a registry, every replica's; what
        each tenant holds here of the shared calls and buffer."""
        local = self.registry.snapshot()
        for tenant_id, tenant in local.items():
            tenant["calls_in_progress"] = self.calls.in_progress(tenant_id)
            tenant["buffer_reserved_bytes"] = self.budget.held_by(tenant_id)
        return local if self.replica is None else self.replica.snapshot(local, self._loop)

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
                self.tunnels.drop(link, "tenant removed from the gateway's configuration", CloseCode.TENANT_REMOVED)
        log.info("tenants file reloaded: %d tenants; %s", len(new),
                 ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in change.items() if v) or "no change")
        return {"status": "ok", "tenants": len(new), **change}

    async def _reload(self) -> dict:
        return self.reload_tenants()

    def _make_metrics(self) -> GatewayMetrics:
        """Gauges read their value when scraped, so they never drift from the registry and the budget."""
        metrics = GatewayMetrics()  # the tunnels by transport: counted by poc.gateway.tunnels as it listens
        metrics.streams_active.set_function(lambda: sum(link.streams_in_flight for link in self.registry.links()))
        metrics.buffered_bytes.set_function(lambda: self.budget.reserved)
        return metrics


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
