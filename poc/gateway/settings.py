"""The gateway's settings: one dataclass, filled by the command line (poc.cli.gateway) or by a test, checked
before anything starts. Defaults live in poc.config and poc.tunnel.limits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .. import config
from ..config import TenantCredentials
from ..tunnel import Limits


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
    resume_window_s: float = config.RESUME_WINDOW_S  # 0: streams cut off with their tunnel fail at once
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
    flight_tunnel_port: int | None = config.FLIGHT_TUNNEL_PORT  # None: no Flight tunnel endpoint
    flight_tunnel_window_bytes: int = config.FLIGHT_TUNNEL_WINDOW_BYTES  # each Flight tunnel call's HTTP/2 window
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
    advertise_flight_tunnel: str | None = None  # its Flight tunnel's URL, `prefer` for links on that tunnel
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
        if not 64 * 1024 <= self.flight_tunnel_window_bytes <= 1 << 30:
            raise config.ConfigError("--flight-tunnel-window-bytes must be from 65536 to 1073741824")
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

