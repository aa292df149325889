"""`python -m poc gateway`: the cloud gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .. import config
from ..config import ConfigError
from .common import (add_cors, add_event_loop, add_tls, add_tunnel_limits, add_ws_impl, check_tls, emit_ready,
                     hide_tracebacks_from_clients, run_on_event_loop, stop_event_for_signals, tunnel_limits)


def add(sub) -> None:
    p = sub.add_parser("gateway", help="cloud gateway: WebSocket /connect, Flight, GET /health",
                       description="Accept connector tunnels on ws://HOST:WS_PORT/connect, serve Arrow Flight on "
                                   "FLIGHT_PORT (clients send 'authorization: Bearer <client_token>'), and "
                                   "GET /livez, /readyz (public) and /health (per tenant, with the admin token) on "
                                   "HTTP_PORT. Port 0 picks a free port. POC_TICKET_SECRET sets the ticket signing "
                                   "key (random if unset); POC_ADMIN_TOKEN the admin token of /health (the "
                                   "per-tenant view is off without one). Limits and what breaking them does: "
                                   "docs/protocol.md §7; the threat model: docs/security.md.")
    p.add_argument("--tenants", required=True, help="YAML file: tenants: {ID: {connector_token, client_token}}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--ws-port", type=int, default=config.WS_PORT, help="tunnel port (default %(default)s)")
    p.add_argument("--flight-port", type=int, default=config.FLIGHT_PORT, help="Flight port (default %(default)s)")
    p.add_argument("--http-port", type=int, default=config.HTTP_PORT,
                   help="HTTP port: health, metrics, and Arrow for browsers (/v1/datasets/{name}, /v1/query, the "
                        "page at /ui/) (default %(default)s)")
    add_cors(p)
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S,
                   help="heartbeat interval announced to connectors (default %(default)s)")
    p.add_argument("--offline-after-s", type=float, default=config.OFFLINE_AFTER_S,
                   help="a connector silent this long is offline (default %(default)s)")
    p.add_argument("--request-timeout-s", type=float, default=config.REQUEST_TIMEOUT_S,
                   help="longest wait for a connector's answer or next frame (default %(default)s)")
    p.add_argument("--flight-tunnel-port", type=int, default=config.FLIGHT_TUNNEL_PORT,
                   help="port of the Flight reverse tunnel (connectors dial flight://HOST:PORT, flight+tls:// with "
                        "--tls-cert; docs/protocol.md §13); -1 turns it off (default %(default)s)")
    p.add_argument("--flight-tunnel-window-bytes", type=int, default=config.FLIGHT_TUNNEL_WINDOW_BYTES,
                   help="the Flight tunnel's HTTP/2 window per stream: what the gateway reads ahead of a client, "
                        "and the most one stream moves per round trip (1 MiB at 50 ms: 21 MB/s); raise it for "
                        "long links, at that much memory per open stream (default %(default)s)")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight streams may finish before they fail (default %(default)s)")
    p.add_argument("--register-timeout-s", type=float, default=config.REGISTER_TIMEOUT_S,
                   help="a new tunnel that has not registered after this long is closed with 4000 "
                        "(default %(default)s)")
    p.add_argument("--resume-window-s", type=float, default=config.RESUME_WINDOW_S,
                   help="a DoGet of a held dataset whose tunnel drops waits this long for the tenant's connector to "
                        "be back (on another of its tunnels, or reconnected; with --registry, at another replica too) "
                        "and then continues from the next row, the client none the wiser; a changed dataset, a query or a database read fails "
                        "instead; 0 = fail at once (docs/protocol.md §6a) (default %(default)s)")
    p.add_argument("--registry", metavar="redis://HOST:PORT/DB",
                   help="share tunnels with other gateway replicas through this Redis: calls for a tenant whose "
                        "tunnel is on another replica are forwarded there or redirected by endpoint locations "
                        "(docs/architecture.md). Needs POC_TICKET_SECRET and POC_PEER_SECRET, the same on every "
                        "replica. Without it (the default) tunnels live in this process only")
    p.add_argument("--gateway-id", help="this replica's name in the registry (default: gw-<random>)")
    p.add_argument("--advertise-flight", metavar="URI",
                   help="this replica's Flight location as clients and other replicas reach it, e.g. "
                        "grpc://10.0.0.5:8815 (default: grpc://HOST:FLIGHT_PORT)")
    p.add_argument("--registry-ttl-s", type=float, default=config.REGISTRY_TTL_S,
                   help="a tunnel's registry entry lives this long unless its replica renews it, every third "
                        "of it (default %(default)s)")
    p.add_argument("--peer-flight", action="append", metavar="URI",
                   help="with --registry: a replica's Flight location (repeatable; give every replica's, this "
                        "one's included). Calls are forwarded, and clients pointed, only to these; without the "
                        "list, to the location each replica advertises in its own registry record, so whoever "
                        "can write Redis could name a host (docs/security.md)")
    p.add_argument("--peer-ca-file", help="with --registry and grpc+tls:// replicas: CA bundle that signed the "
                                          "other replicas' certificates (default: the system's)")
    p.add_argument("--advertise-tunnel", metavar="URL",
                   help="with --registry: this replica's tunnel URL as connectors reach it, suggested to connectors "
                        "that another replica asks to move (default: ws[s]://HOST:WS_PORT/connect)")
    p.add_argument("--advertise-flight-tunnel", metavar="URL",
                   help="with --registry: this replica's Flight tunnel URL as connectors reach it, suggested to "
                        "connectors on the Flight tunnel that another replica asks to move (default: "
                        "flight[+tls]://HOST:FLIGHT_TUNNEL_PORT while that port is open)")
    p.add_argument("--rebalance-s", type=float, default=config.REBALANCE_S,
                   help="with --registry: how often this replica compares the tunnels it holds with its share "
                        "and, above it, asks one connector to move to the least-loaded replica; 0 turns it off "
                        "(default %(default)s)")
    p.add_argument("--drain-delay-s", type=float, default=1.0,
                   help="with --registry, on SIGTERM: how long Flight goes on answering (forwarding to other "
                        "replicas) after /readyz turns 503, for clients a load balancer sent before it noticed; "
                        "set it to the balancer's health-check interval (default %(default)s)")
    p.add_argument("--max-buffered-bytes", type=int, default=config.MAX_BUFFERED_BYTES,
                   help="gateway-wide cap on what open streams may buffer (each reserves its window); over it a "
                        "new DoGet fails at once with FlightUnavailableError; 0 = no cap (default %(default)s)")
    p.add_argument("--max-tenant-buffered-bytes", type=int, default=None,
                   help="what one tenant's open streams may reserve of --max-buffered-bytes, initial and grown "
                        "windows alike, so that other tenants always have room; over it the tenant's new DoGet "
                        "fails at once with FlightUnavailableError (default: half of --max-buffered-bytes)")
    p.add_argument("--max-calls-per-tenant", type=int, default=config.MAX_CALLS_PER_TENANT,
                   help="Flight and HTTP calls one tenant may have in progress at once (a DoGet until its stream "
                        "ends); the next is refused at once, FlightUnavailableError or HTTP 503; 0 = no cap "
                        "(default %(default)s)")
    p.add_argument("--max-pending-tunnels", type=int, default=config.MAX_PENDING_TUNNELS,
                   help="tunnels open and not registered yet that the gateway holds at once (each for at most "
                        "--register-timeout-s, with at most one control message); more are closed at once with "
                        "1013; 0 = no cap (default %(default)s)")
    p.add_argument("--max-http-connections", type=int, default=config.HTTP_MAX_CONNECTIONS,
                   help="connections the HTTP port holds at once; more are answered 503 and closed "
                        "(default %(default)s)")
    p.add_argument("--http-request-deadline-s", type=float, default=config.HTTP_REQUEST_DEADLINE_S,
                   help="an HTTP request's headers and body must arrive within this, counted from the connection's "
                        "start or the end of the previous response; a slower one gets 408 and is closed "
                        "(default %(default)s)")
    p.add_argument("--max-links-per-tenant", type=int, default=config.MAX_LINKS_PER_TENANT,
                   help="tunnels one tenant may hold on this gateway (each connector's --tunnels count); a "
                        "registration past it is refused with close code 4008 and the connector backs off; "
                        "0 = no cap (default %(default)s)")
    p.add_argument("--gil-switch-ms", type=float, default=config.GIL_SWITCH_MS,
                   help="how long one of the gateway's threads may hold Python's GIL while another waits for it "
                        "(sys.setswitchinterval; Python's default is 5): shorter lets a Flight call's thread in "
                        "sooner while the event loop relays data (docs/results.md) (default %(default)s)")
    p.add_argument("--tunnel-rcvbuf-bytes", type=int, default=config.TUNNEL_RCVBUF_BYTES,
                   help="receive buffer (SO_RCVBUF) of a tunnel socket whose TCP round trip is under 1 ms: about "
                        "the most data a connector's control answer waits behind in this gateway's kernel; links "
                        "with longer round trips keep the kernel's autotuning. 0 leaves every socket to the kernel "
                        "(default %(default)s; the trade-off is in docs/results.md)")
    p.add_argument("--ticket-ttl-s", type=float, default=config.TICKET_TTL_S,
                   help="how long a ticket from GetFlightInfo can be redeemed (default %(default)s)")
    p.add_argument("--frame-allocator", choices=config.FRAME_ALLOCATORS,
                   default=os.environ.get("POC_FRAME_ALLOCATOR") or None,
                   help="the allocator holding each WebSocket data frame from its arrival until its batch is sent "
                        "to its client: the kernel's copy of those bytes into the client's socket cost three times "
                        "as much from mimalloc (Arrow's default) as from jemalloc, and the system allocator kept two "
                        "to three times the memory (docs/results.md) (default jemalloc, or Arrow's default pool where "
                        "pyarrow has no jemalloc; POC_FRAME_ALLOCATOR sets the default)")
    add_tunnel_limits(p)
    add_tls(p)
    add_ws_impl(p)
    add_event_loop(p)
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from ..gateway.app import run_gateway
    from ..gateway.settings import GatewayConfig
    from ..transports import memory as frame_memory

    check_tls(args)
    if not 0 <= args.resume_window_s <= 3600:
        raise ConfigError("--resume-window-s must be between 0 and 3600")
    if not 0 < args.gil_switch_ms <= 100:
        raise ConfigError("--gil-switch-ms must be above 0 and at most 100")
    frames = frame_memory.use(args.frame_allocator).backend_name
    hide_tracebacks_from_clients()
    sys.setswitchinterval(args.gil_switch_ms / 1000)
    files = config.raise_open_files_limit()
    logging.getLogger("poc.gateway").info("open-files limit %d: room for about %d tunnels", files, max(0, files - 64))
    cfg = GatewayConfig(
        tenants=config.load_tenants(args.tenants), tenants_file=args.tenants, host=args.host, ws_port=args.ws_port,
        flight_port=args.flight_port, http_port=args.http_port, heartbeat_s=args.heartbeat_s,
        cors_origins=tuple(args.cors_origin or ()),
        offline_after_s=args.offline_after_s, request_timeout_s=args.request_timeout_s,
        limits=tunnel_limits(args),
        ticket_secret=os.environb.get(b"POC_TICKET_SECRET"), max_requests_per_s=args.max_requests_per_s,
        tls_cert=args.tls_cert, tls_key=args.tls_key, shutdown_grace_s=args.shutdown_grace_s, ws_impl=args.ws_impl,
        flight_tunnel_port=None if args.flight_tunnel_port < 0 else args.flight_tunnel_port,
        flight_tunnel_window_bytes=args.flight_tunnel_window_bytes,
        register_timeout_s=args.register_timeout_s, max_buffered_bytes=args.max_buffered_bytes,
        resume_window_s=args.resume_window_s,
        ticket_ttl_s=args.ticket_ttl_s, tunnel_rcvbuf_bytes=max(0, args.tunnel_rcvbuf_bytes),
        max_tenant_buffered_bytes=args.max_tenant_buffered_bytes, max_calls_per_tenant=args.max_calls_per_tenant,
        max_links_per_tenant=args.max_links_per_tenant, max_pending_tunnels=args.max_pending_tunnels,
        http_max_connections=args.max_http_connections,
        http_request_deadline_s=args.http_request_deadline_s, admin_token=os.environ.get("POC_ADMIN_TOKEN") or None)
    cfg.check()
    logging.getLogger("poc.gateway").info(
        "GIL switch interval %g ms; receive buffer of near tunnels %s; frames held by %s", args.gil_switch_ms,
        f"{cfg.tunnel_rcvbuf_bytes} bytes" if cfg.tunnel_rcvbuf_bytes else "left to the kernel", frames)
    if args.registry:
        if not args.registry.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("--registry must be a redis://HOST:PORT/DB (or rediss://) URL")
        for name in ("POC_TICKET_SECRET", "POC_PEER_SECRET"):
            if len(os.environb.get(name.encode(), b"")) < 16:
                raise ConfigError(f"--registry needs {name} in the environment, at least 16 characters and the "
                                  "same on every replica")
        if args.registry_ttl_s < 1:
            raise ConfigError("--registry-ttl-s must be at least 1")
        cfg.registry_url, cfg.peer_secret = args.registry, os.environb[b"POC_PEER_SECRET"]
        cfg.advertise_flight, cfg.registry_ttl_s = args.advertise_flight, args.registry_ttl_s
        cfg.drain_delay_s = max(0.0, args.drain_delay_s)
        cfg.advertise_tunnel, cfg.rebalance_s = args.advertise_tunnel, max(0.0, args.rebalance_s)
        if args.advertise_flight_tunnel and not args.advertise_flight_tunnel.startswith(("flight://", "flight+tls://")):
            raise ConfigError("--advertise-flight-tunnel must be a flight://HOST:PORT or flight+tls://HOST:PORT URL")
        cfg.advertise_flight_tunnel = args.advertise_flight_tunnel
        cfg.peer_ca_file = args.peer_ca_file
        from ..gateway.directory import FLIGHT_LOCATION, GATEWAY_ID

        if args.gateway_id:
            if not GATEWAY_ID.fullmatch(args.gateway_id):
                raise ConfigError("--gateway-id must be 1-64 of A-Z a-z 0-9 . _ -")
            cfg.gateway_id = args.gateway_id
        for location in (args.peer_flight or []):
            if not FLIGHT_LOCATION.fullmatch(location):
                raise ConfigError(f"--peer-flight {location!r} is not a grpc:// or grpc+tls:// HOST:PORT location")
        cfg.peer_flights = tuple(args.peer_flight or ())
        if cfg.peer_flights and args.advertise_flight and args.advertise_flight not in cfg.peer_flights:
            raise ConfigError("--advertise-flight must be one of the --peer-flight locations when they are given")

    async def main() -> None:
        stop = stop_event_for_signals(asyncio.get_running_loop())
        await run_gateway(cfg, stop, on_ready=lambda ports: emit_ready(component="gateway", pid=os.getpid(), **ports))

    run_on_event_loop(main, args)
    return 0


