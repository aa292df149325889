"""`python -m poc connector`: the on-premise connector."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading

from .. import config
from ..config import ConfigError
from .common import add_event_loop, add_ws_impl, emit_ready, run_on_event_loop, stop_event_for_signals


def add(sub) -> None:
    p = sub.add_parser("connector", help="on-premise connector: dials out to the gateway, serves Parquet datasets",
                       description="Dial out to the gateway, register, and serve the Parquet datasets of --data "
                                   "(a file, or a folder of *.parquet; dataset name = file stem). Reconnects "
                                   "with exponential backoff and jitter; exits 3 if the gateway refuses the token, 4 if a newer "
                                   "connector of the same tenant replaced this one.")
    p.add_argument("--gateway", required=True, action="append",
                   help="ws://HOST:PORT/connect or wss://… (WebSocket tunnel), flight://HOST:PORT or flight+tls://… (Flight tunnel, docs/protocol.md "
                        "§13); the scheme picks the transport. For gateway replicas give it several "
                        "times, or give a ws[s]:// name that resolves to several addresses (resolved again at "
                        "every reconnect): the connector keeps --tunnels tunnels, each to a different one")
    p.add_argument("--tunnels", type=int, default=None,
                   help="live tunnels to keep, each to a different gateway while there are enough (default: 2 "
                        "with several gateways, else 1); a tunnel whose gateway says goaway is replaced by one "
                        "to another gateway before it closes")
    p.add_argument("--connector-id", help="this connector's id in its registrations (1-120 printable ASCII "
                                          "characters, no spaces; default: derived from this host and the tenant, "
                                          "so a restarted connector replaces its own tunnels). Each tunnel "
                                          "registers as ID/POSITION; a registration with the id of a live tunnel "
                                          "on the same gateway replaces it (protocol.md §2)")
    p.add_argument("--tenant", required=True, help="tenant id, as in the gateway's tenants file")
    p.add_argument("--token", help="connector token (or set POC_CONNECTOR_TOKEN, which keeps it out of ps)")
    p.add_argument("--data", help="Parquet file or folder")
    p.add_argument("--sources", help="YAML file naming datasets and where each comes from: a database table or "
                                     "query through ADBC (postgresql://, sqlite://), or a Parquet path; the "
                                     "password from POC_SOURCE_PASSWORD or the file's password_file "
                                     "(docs/operations.md, 'Connectors on databases')")
    p.add_argument("--delay-ms", default="200-250", help="simulated extraction delay before each transfer, "
                                                         "MS or LOW-HIGH (uniform); 0 for none (default %(default)s)")
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S, help="heartbeat interval, or the gateway's when shorter; the Flight tunnel also pings each of its "
                        "connections at this interval. Behind a proxy keep it inside the proxy's idle timeout "
                        "(default %(default)s)")
    p.add_argument("--ca-file", help="CA bundle to verify a wss:// or flight+tls:// gateway")
    p.add_argument("--proxy", metavar="URL",
                   help="reach the gateway through this HTTP proxy, with HTTP CONNECT: http://[USER@]HOST:PORT; "
                        "the password, if it needs one, from POC_PROXY_PASSWORD (never on the command line). "
                        "Without it the usual variables apply: http_proxy for ws://, https_proxy for wss:// and "
                        "flight[+tls]://, no_proxy honoured. The proxy resolves the gateway's name: give "
                        "replicas as several --gateway (docs/operations.md, 'Behind a corporate proxy')")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (poc_connector_*) on this port; off by default; 0 picks one")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default %(default)s)")
    p.add_argument("--batch-bytes", type=int, default=config.BATCH_BYTES,
                   help="target size of each record batch sent (default %(default)s); batches larger than the "
                        "gateway's max_frame_bytes are halved until they fit")
    p.add_argument("--compression", choices=("auto", "always", "off"), default="auto",
                   help="IPC body compression (zstd, else lz4, if the gateway accepts one; docs/protocol.md §4b): "
                        "auto compresses batches on a wide-area link (smallest heartbeat round trip 2 ms or more; "
                        "until one comes back within 2 ms, a new link's heartbeats go 1, 2, 4 … s apart) while "
                        "it drains slower than --compress-below-mbps, always compresses every batch it shrinks, "
                        "off offers no codec (default %(default)s)")
    p.add_argument("--compress-below-mbps", type=float, default=config.COMPRESS_BELOW_MBPS,
                   help="with --compression auto: the link speed below which batches are compressed "
                        "(default %(default)s, from the measurements in docs/results.md)")
    p.add_argument("--no-sql", action="store_true",
                   help="answer no SQL: Flight SQL clients of this tenant get 'does not support SQL' (by default "
                        "SELECT queries over the datasets run here in DuckDB, and only their results cross the tunnel)")
    p.add_argument("--max-result-bytes", type=int, default=config.MAX_RESULT_BYTES,
                   help="IPC bytes one query may send; past it the client gets an error, never a short result "
                        "(default %(default)s)")
    p.add_argument("--query-timeout-s", type=float, default=config.QUERY_TIMEOUT_S,
                   help="a query running longer is interrupted and its client gets FlightTimedOutError "
                        "(default %(default)s)")
    p.add_argument("--db-connections", type=int, default=config.DB_CONNECTIONS,
                   help="connections to each database of --sources at once; more DoGets and queries wait for one "
                        "(within the gateway's request timeout) instead of failing (default %(default)s)")
    p.add_argument("--query-memory-mb", type=int, default=config.QUERY_MEMORY_MB,
                   help="memory the SQL engine may hold for all queries together (default %(default)s)")
    add_ws_impl(p)
    add_event_loop(p)
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from ..connector import Connector, ConnectorConfig, RegistrationRefused, Replaced, names_several
    from ..sources import load_data

    token = args.token or os.environ.get("POC_CONNECTOR_TOKEN")
    if not token:
        raise ConfigError("a connector token is needed: --token TOKEN or POC_CONNECTOR_TOKEN")
    for url in args.gateway:
        if url.startswith(("grpc://", "grpcs://")):
            raise ConfigError(f"--gateway {url!r}: the gRPC tunnel is retired; dial the Flight tunnel, "
                              "flight://HOST:PORT (flight+tls:// for TLS), on the gateway's --flight-tunnel-port")
        if not url.startswith(("ws://", "wss://", "flight://", "flight+tls://")):
            raise ConfigError("--gateway must be ws[s]://HOST:PORT/connect (WebSocket tunnel) or "
                              f"flight[+tls]://HOST:PORT (Flight tunnel), got {url!r}")
    from ..connector.proxy import for_gateway, from_option

    explicit = from_option(args.proxy, dict(os.environ)) if args.proxy else None
    proxies = {url: proxy for url in dict.fromkeys(args.gateway) if (proxy := for_gateway(url, explicit))}
    for url, proxy in proxies.items():  # decided once, here: every link to the URL goes the same way
        logging.getLogger("poc.connector").info("gateway %s through proxy %s (HTTP CONNECT)", url, proxy.shown)
    several = len(set(args.gateway)) > 1 or (args.gateway[0] not in proxies and names_several(args.gateway[0]))
    tunnels = args.tunnels if args.tunnels is not None else (2 if several else 1)
    if tunnels < 1:
        raise ConfigError("--tunnels must be at least 1")
    if args.connector_id is not None and not config.valid_connector_id(args.connector_id):
        raise ConfigError("--connector-id must be 1-120 printable ASCII characters without spaces")
    if args.batch_bytes < 1:
        raise ConfigError("--batch-bytes must be positive")
    if args.max_result_bytes < 1 or args.query_timeout_s <= 0 or args.query_memory_mb < 64 or args.db_connections < 1:
        raise ConfigError("--max-result-bytes, --query-timeout-s and --db-connections must be positive, "
                          "--query-memory-mb at least 64")
    sources = load_data(args.data, args.sources, args.batch_bytes)
    cfg = ConnectorConfig(gateway=args.gateway[0], tenant_id=args.tenant, token=token,
                          delay_ms=config.parse_delay(args.delay_ms), heartbeat_s=args.heartbeat_s,
                          ca_file=args.ca_file, ws_impl=args.ws_impl, more_gateways=tuple(args.gateway[1:]),
                          tunnels=tunnels, compression=args.compression,
                          compress_below_mbps=args.compress_below_mbps, sql=not args.no_sql,
                          max_result_bytes=args.max_result_bytes, query_timeout_s=args.query_timeout_s,
                          query_memory_mb=args.query_memory_mb, db_connections=args.db_connections, proxies=proxies)
    if args.connector_id:
        cfg.connector_id = args.connector_id
    connector = Connector(cfg, sources)
    metrics_port = {}
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        server, _ = start_http_server(args.metrics_port, args.metrics_host, registry=connector.metrics.registry)
        metrics_port = {"metrics_port": server.server_address[1]}
        logging.getLogger("poc.connector").info("metrics on http://%s:%d/metrics", args.metrics_host,
                                                server.server_address[1])
    first = threading.Event()

    def registered(session_id: str) -> None:
        if not first.is_set():
            first.set()
            emit_ready(component="connector", pid=os.getpid(), tenant_id=args.tenant, session_id=session_id,
                        datasets=connector.names, **metrics_port)

    connector.on_registered = registered

    async def main() -> None:
        stop = stop_event_for_signals(asyncio.get_running_loop())
        await connector.run(stop)

    try:
        run_on_event_loop(main, args)
    except RegistrationRefused as exc:
        logging.getLogger("poc.connector").error("%s", exc)
        return 3
    except Replaced as exc:
        logging.getLogger("poc.connector").error("%s; exiting", exc)
        return 4
    return 0


