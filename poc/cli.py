"""`python -m poc <command>`: run each component for real, or make the dataset."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading

from . import config, logs
from .config import ConfigError


WORKBOOK_DEPENDENCIES = {"numpy", "polars", "altair", "vl_convert", "papermill", "jupyterlab", "ipykernel",
                         "nbconvert", "psutil", "tqdm", "cryptography"}  # pyproject.toml [workbook]


def _emit_ready(**fields) -> None:
    """One JSON line on stdout once a component serves: how the runner and tests learn its ports."""
    print(json.dumps({"ready": True, **fields}), flush=True)


def _stop_event_for_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _add_tunnel_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-frame-bytes", type=int, default=config.MAX_FRAME_BYTES,
                   help="largest binary frame payload a connector may send (default %(default)s)")
    p.add_argument("--window-bytes", type=int, default=config.MAX_WINDOW_BYTES,
                   help="the largest credit window of a stream: the most bytes buffered per stream "
                        "(default %(default)s)")
    p.add_argument("--initial-window-bytes", type=int, default=None,
                   help=f"a stream's window when it opens (default {config.WINDOW_BYTES}, kept between "
                        "--max-frame-bytes and --window-bytes); with --window-policy adaptive it grows towards twice the link's measured "
                        "bandwidth-delay product, up to --window-bytes, while --max-buffered-bytes has room")
    p.add_argument("--window-policy", choices=("adaptive", "fixed"), default="adaptive",
                   help="adaptive: windows grow with the link's bandwidth-delay product, measured with pings "
                        "(protocol 1.4 connectors); fixed: they keep their initial size (default %(default)s)")
    p.add_argument("--codecs", default="zstd,lz4",
                   help="IPC body codecs accepted from connectors that offer them, best first, comma-separated; "
                        "'' or none accepts none (default %(default)s; docs/protocol.md §4b)")
    p.add_argument("--max-streams", type=int, default=config.MAX_STREAMS,
                   help="streams in flight per connector link (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=config.MAX_MESSAGE_BYTES,
                   help="largest control message from a connector (default %(default)s)")
    p.add_argument("--max-unsolicited-per-s", type=float, default=50.0,
                   help="heartbeats and messages for closed streams a connector may send per second; "
                        "a flood closes its link with 4005 (default %(default)s)")
    p.add_argument("--max-requests-per-s", type=float, default=0.0,
                   help="Flight calls forwarded into one tenant's tunnel per second; over it a call fails at "
                        "once with FlightUnavailableError; 0 = unlimited (default %(default)s)")


def _add_measurement_options(p: argparse.ArgumentParser) -> None:
    """What `bench` and `soak` share: the table, where it is kept, gateway options, the JSON output."""
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the table (default %(default)s)")
    p.add_argument("--data-dir", default="outputs/data", help="where the dataset is made or reused")
    p.add_argument("--gateway-arg", action="append", help="extra gateway argument (repeatable)")
    p.add_argument("--json", help="also write the figures, raw runs and the machine to this file")


def _add_event_loop(p: argparse.ArgumentParser) -> None:
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"),
                   default=os.environ.get("POC_EVENT_LOOP", "asyncio"),
                   help="asyncio's own event loop, or uvloop's (libuv; pip install 'poc[uvloop]'). Measured, "
                        "uvloop did not pay here (docs/results.md): picows already does the socket work in "
                        "Cython (default %(default)s; POC_EVENT_LOOP sets the default)")


def _run(main, args: argparse.Namespace) -> None:
    """asyncio.run(main()) on the event loop --event-loop names."""
    if getattr(args, "event_loop", "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("--event-loop uvloop needs uvloop: pip install 'poc[uvloop]'") from None
        logging.getLogger("poc").info("event loop: uvloop %s", uvloop.__version__)
        uvloop.run(main())
        return
    asyncio.run(main())


def _add_ws_impl(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ws-impl", choices=config.WS_IMPLS, default=os.environ.get("POC_WS_IMPL", config.WS_IMPL),
                   help="WebSocket implementation; both speak the same wire protocol "
                        "(default %(default)s; POC_WS_IMPL sets the default)")


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// and grpc+tls:// (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")


def _check_tls(args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")


def _limits(args: argparse.Namespace):
    from .tunnel import Limits

    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip() and c.strip() != "none")
    initial = args.initial_window_bytes or min(max(config.WINDOW_BYTES, args.max_frame_bytes), args.window_bytes)
    if not args.max_frame_bytes <= initial <= args.window_bytes:
        raise ConfigError("--initial-window-bytes must lie between --max-frame-bytes and --window-bytes")
    try:
        return Limits(args.max_frame_bytes, args.window_bytes, args.max_streams,
                      max_message_bytes=args.max_message_bytes, unsolicited_per_s=args.max_unsolicited_per_s,
                      initial_window_bytes=initial, adaptive_window=args.window_policy == "adaptive",
                      codecs=codecs)
    except ValueError as exc:
        raise ConfigError(f"gateway limits: {exc}") from None


def cmd_gateway(args: argparse.Namespace) -> int:
    from .gateway.app import GatewayConfig, run_gateway

    _check_tls(args)
    if not 0 < args.gil_switch_ms <= 100:
        raise ConfigError("--gil-switch-ms must be above 0 and at most 100")
    _hide_tracebacks_from_clients()
    sys.setswitchinterval(args.gil_switch_ms / 1000)
    files = config.raise_open_files_limit()
    logging.getLogger("poc.gateway").info("open-files limit %d: room for about %d tunnels", files, max(0, files - 64))
    cfg = GatewayConfig(
        tenants=config.load_tenants(args.tenants), tenants_file=args.tenants, host=args.host, ws_port=args.ws_port,
        flight_port=args.flight_port, http_port=args.http_port, heartbeat_s=args.heartbeat_s,
        cors_origins=tuple(args.cors_origin or ()),
        offline_after_s=args.offline_after_s, request_timeout_s=args.request_timeout_s,
        limits=_limits(args),
        ticket_secret=os.environb.get(b"POC_TICKET_SECRET"), max_requests_per_s=args.max_requests_per_s,
        tls_cert=args.tls_cert, tls_key=args.tls_key, shutdown_grace_s=args.shutdown_grace_s, ws_impl=args.ws_impl,
        grpc_tunnel_port=None if args.grpc_tunnel_port < 0 else args.grpc_tunnel_port,
        register_timeout_s=args.register_timeout_s, max_buffered_bytes=args.max_buffered_bytes,
        ticket_ttl_s=args.ticket_ttl_s, tunnel_rcvbuf_bytes=max(0, args.tunnel_rcvbuf_bytes),
        max_tenant_buffered_bytes=args.max_tenant_buffered_bytes, max_calls_per_tenant=args.max_calls_per_tenant,
        max_links_per_tenant=args.max_links_per_tenant, max_pending_tunnels=args.max_pending_tunnels,
        http_max_connections=args.max_http_connections,
        http_request_deadline_s=args.http_request_deadline_s, admin_token=os.environ.get("POC_ADMIN_TOKEN") or None)
    cfg.check()
    logging.getLogger("poc.gateway").info(
        "GIL switch interval %g ms; receive buffer of near tunnels %s", args.gil_switch_ms,
        f"{cfg.tunnel_rcvbuf_bytes} bytes" if cfg.tunnel_rcvbuf_bytes else "left to the kernel")
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
        cfg.peer_ca_file = args.peer_ca_file
        from .gateway.directory import FLIGHT_LOCATION, GATEWAY_ID

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
        stop = _stop_event_for_signals(asyncio.get_running_loop())
        await run_gateway(cfg, stop, on_ready=lambda ports: _emit_ready(component="gateway", pid=os.getpid(), **ports))

    _run(main, args)
    return 0


def cmd_connector(args: argparse.Namespace) -> int:
    from .catalog import load_datasets
    from .connector.app import Connector, ConnectorConfig, RegistrationRefused, Replaced, names_several

    token = args.token or os.environ.get("POC_CONNECTOR_TOKEN")
    if not token:
        raise ConfigError("a connector token is needed: --token TOKEN or POC_CONNECTOR_TOKEN")
    for url in args.gateway:
        if not url.startswith(("ws://", "wss://", "grpc://", "grpcs://")):
            raise ConfigError("--gateway must be ws[s]://HOST:PORT/connect (WebSocket tunnel) or grpc[s]://HOST:PORT "
                              f"(gRPC tunnel), got {url!r}")
    several = len(set(args.gateway)) > 1 or names_several(args.gateway[0])
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
    if not args.data and not args.sources:
        raise ConfigError("give --data (Parquet) or --sources (a YAML file of datasets), or both")
    datasets = load_datasets(args.data, args.batch_bytes) if args.data else {}
    sources = {}
    if args.sources:
        from .catalog import load_file
        from .sources import load_sources

        sources, files = load_sources(args.sources)
        clash = (set(sources) | set(files)) & set(datasets)
        if clash:
            raise ConfigError(f"datasets named both in --data and in --sources: {sorted(clash)}")
        datasets.update({name: load_file(name, file, args.batch_bytes) for name, file in files.items()})
    cfg = ConnectorConfig(gateway=args.gateway[0], tenant_id=args.tenant, token=token,
                          delay_ms=config.parse_delay(args.delay_ms), heartbeat_s=args.heartbeat_s,
                          ca_file=args.ca_file, ws_impl=args.ws_impl, more_gateways=tuple(args.gateway[1:]),
                          tunnels=tunnels, compression=args.compression,
                          compress_below_mbps=args.compress_below_mbps, sql=not args.no_sql,
                          max_result_bytes=args.max_result_bytes, query_timeout_s=args.query_timeout_s,
                          query_memory_mb=args.query_memory_mb, db_connections=args.db_connections)
    if args.connector_id:
        cfg.connector_id = args.connector_id
    connector = Connector(cfg, datasets, sources)
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
            _emit_ready(component="connector", pid=os.getpid(), tenant_id=args.tenant, session_id=session_id,
                        datasets=connector.names, **metrics_port)

    connector.on_registered = registered

    async def main() -> None:
        stop = _stop_event_for_signals(asyncio.get_running_loop())
        await connector.run(stop)

    try:
        _run(main, args)
    except RegistrationRefused as exc:
        logging.getLogger("poc.connector").error("%s", exc)
        return 3
    except Replaced as exc:
        logging.getLogger("poc.connector").error("%s; exiting", exc)
        return 4
    return 0


def _add_cors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cors-origin", action="append",
                   help="an origin (scheme://host:port) whose pages may call the HTTP Arrow endpoints from a "
                        "browser (repeatable; none by default: only pages served by this port)")


def cmd_direct(args: argparse.Namespace) -> int:
    from .catalog import load_datasets
    from .direct import DirectFlightServer

    from .auth import flight_certificate

    _check_tls(args)
    _hide_tracebacks_from_clients()
    tenants = config.load_tenants(args.tenants) if args.tenants else None
    scheme, tls = ("grpc+tls", [flight_certificate(args.tls_cert, args.tls_key)]) if args.tls_cert else ("grpc", None)
    if not args.data and not args.sources:
        raise ConfigError("give --data (Parquet) or --sources (a YAML file of datasets), or both")
    datasets = load_datasets(args.data) if args.data else {}
    sources = {}
    if args.sources:
        from .catalog import load_file
        from .sources import load_sources

        sources, files = load_sources(args.sources)
        datasets.update({name: load_file(name, file) for name, file in files.items()})
    server = DirectFlightServer(f"{scheme}://{args.host}:{args.port}", datasets, tenants,
                                config.parse_delay(args.delay_ms), sources=sources, db_connections=args.db_connections,
                                tls_certificates=tls)
    ports = {"flight_port": server.port}
    if args.http_port >= 0:
        from .http_arrow import default_vendor_dir, serve_arrow

        http = serve_arrow((args.host, args.http_port),
                           server.arrow_http(tuple(args.cors_origin or ()), default_vendor_dir()))
        ports["http_port"] = http.server_address[1]
    def shutdown(*_) -> None:  # shutdown() waits for calls in flight, so not on the signal's own stack
        threading.Thread(target=server.shutdown, name="shutdown").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown)
    _emit_ready(component="direct", pid=os.getpid(), **ports)
    server.serve()
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from .workbook.dataset import write_dataset

    path = write_dataset(args.rows, args.out, args.seed)
    print(json.dumps({"path": str(path), "rows": args.rows, "bytes": path.stat().st_size}))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .workbook.load.client import LoadConfig, records_as_dicts, run_load
    from .workbook.load.metrics import summarize, to_frame

    tenants = config.load_tenants(args.tenants)
    chosen = list(tenants.values())[: args.tenant_count]
    if args.tenant_count > len(tenants):
        raise ConfigError(f"--tenant-count {args.tenant_count} but {args.tenants} has only {len(tenants)} tenants")
    cfg = LoadConfig(args.flight, {t.tenant_id: t.client_token for t in chosen}, args.requests, args.concurrency,
                     args.dataset, args.timeout_s, args.label,
                     tls_root_certs=Path(args.ca_file).read_bytes() if args.ca_file else None)
    records = records_as_dicts(run_load(cfg))
    df = to_frame(records)
    summary = summarize(df)
    doc = {"summary": summary, "tenants": {t: summarize(df.filter(df["tenant_id"] == t))
                                           for t in sorted(set(df["tenant_id"]))}, "requests": records}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    df.write_parquet(out / "results.parquet")
    print(_summary_text(summary, args.label))
    print(f"results: {out / 'results.json'} and {out / 'results.parquet'}")
    return 0 if summary["error_rate"] < 1 else 1


def _summary_text(summary: dict, label: str) -> str:
    lines = [f"{label}: {summary['requests']} requests, {summary['success']} ok, {summary['errors']} errors, "
             f"{summary['timeouts']} timeouts (error rate {100 * summary['error_rate']:.1f} %), "
             f"{summary['throughput_rps'] or 0:.1f} req/s, {summary['throughput_mb_s'] or 0:.0f} MB/s "
             f"over {summary['duration_s']:.1f} s",
             f"{'phase':<18}{'p50':>10}{'p95':>10}{'p99':>10}   (ms, successful requests)"]
    for phase in ("queued_ms", "connect_ms", "metadata_ms", "data_transfer_ms", "total_ms"):
        q = summary[phase]
        lines.append(f"{phase:<18}" + "".join(f"{q[k]:>10.1f}" if q[k] is not None else f"{'-':>10}"
                                             for k in ("p50", "p95", "p99")))
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from .workbook.bench import BenchParams, run_bench, table, write_json

    levels = tuple(int(x) for x in args.concurrency.split(","))
    tunnels = tuple(t.strip() for t in args.tunnels.split(","))
    if not tunnels or set(tunnels) - {"websocket", "grpc"} or len(set(tunnels)) != len(tunnels):
        raise ConfigError(f"--tunnels takes websocket and/or grpc, comma-separated; got {args.tunnels!r}")
    if args.repetitions < 1 or args.rows < 1 or not levels or min(levels) < 1:
        raise ConfigError("--rows, --repetitions and every --concurrency level must be >= 1")
    params = BenchParams(rows=args.rows, concurrency=levels, requests_per_level=args.requests,
                         single_runs=args.single_runs, info_calls=args.info_calls, repetitions=args.repetitions,
                         data_dir=args.data_dir, gateway_args=tuple(args.gateway_arg or ()),
                         connector_args=tuple(args.connector_arg or ()), tunnels=tunnels)
    result = run_bench(params, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"figures and raw runs: {args.json}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from .workbook.soak import TRANSPORTS, SoakParams, passed, run_soak, table, write_json

    transports = tuple(t.strip() for t in args.transports.split(","))
    if not transports or set(transports) - set(TRANSPORTS):
        raise ConfigError(f"--transports takes {', '.join(TRANSPORTS)}, comma-separated; got {args.transports!r}")
    if args.seconds <= 0 or args.clients < 1 or not 0 <= args.abandoning <= args.clients or args.tenants < 1:
        raise ConfigError("need --seconds > 0, --clients >= 1, 0 <= --abandoning <= --clients, --tenants >= 1")
    params = SoakParams(seconds=args.seconds, clients=args.clients, abandoning=args.abandoning, tenants=args.tenants,
                        rows=args.rows, transports=transports, sample_s=min(args.sample_s, args.seconds),
                        data_dir=args.data_dir, gateway_args=tuple(args.gateway_arg or ()))
    results = run_soak(params, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(results))
    if args.json:
        write_json(params, results, args.json)
        print(f"figures: {args.json}")
    return 0 if all(map(passed, results)) else 1


def cmd_swarm(args: argparse.Namespace) -> int:
    from .workbook.swarm import Swarm

    tenants = list(config.load_tenants(args.tenants).values())
    count = args.count or len(tenants)
    if not 1 <= count <= len(tenants):
        raise ConfigError(f"--count must be between 1 and the {len(tenants)} tenants of {args.tenants}")
    limit = config.raise_open_files_limit()
    if limit < count + 64:
        raise ConfigError(f"{count} tunnels need {count + 64} open files; the limit is {limit} (ulimit -n)")
    logging.getLogger("poc.connector").setLevel(logging.WARNING)  # thousands of registrations are not news
    swarm = Swarm(args.gateway, tenants[:count], args.heartbeat_s, args.ws_impl, args.per_second, args.ca_file)
    announced = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == total and not announced.is_set():
            announced.set()
            _emit_ready(component="swarm", pid=os.getpid(), tunnels=total)
        logging.getLogger("poc.swarm").info("%d of %d tunnels registered", done, total)

    async def main() -> None:
        stop = _stop_event_for_signals(asyncio.get_running_loop())
        await swarm.run(stop, progress)

    asyncio.run(main())
    for failure in swarm.failed[:10]:
        logging.getLogger("poc.swarm").error("%s", failure)
    return 0 if not swarm.failed else 3


def cmd_report(args: argparse.Namespace) -> int:
    from .workbook.report import run_report

    out = run_report(args.params, args.output_root)
    print(f"report: {out / 'report.html'}")
    print(f"executed notebook, results, charts and machine info: {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poc",
        description="Arrow Flight through a reverse WebSocket tunnel: run the gateway, a connector, "
                    "the direct baseline, or make the seed's dataset. Each server prints one JSON line "
                    "{\"ready\": true, ...ports} on stdout once it serves; logs go to stderr.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text for people, or one JSON object per line with tenant, session, request_id and "
                             "stream_id fields where they apply (default %(default)s); before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    _add_cors(p)
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S,
                   help="heartbeat interval announced to connectors (default %(default)s)")
    p.add_argument("--offline-after-s", type=float, default=config.OFFLINE_AFTER_S,
                   help="a connector silent this long is offline (default %(default)s)")
    p.add_argument("--request-timeout-s", type=float, default=config.REQUEST_TIMEOUT_S,
                   help="longest wait for a connector's answer or next frame (default %(default)s)")
    p.add_argument("--grpc-tunnel-port", type=int, default=config.GRPC_TUNNEL_PORT,
                   help="port of the gRPC reverse tunnel (connectors dial grpc://HOST:PORT); -1 turns it off "
                        "(default %(default)s)")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight streams may finish before they fail (default %(default)s)")
    p.add_argument("--register-timeout-s", type=float, default=config.REGISTER_TIMEOUT_S,
                   help="a new tunnel that has not registered after this long is closed with 4000 "
                        "(default %(default)s)")
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
    _add_tunnel_limits(p)
    _add_tls(p)
    _add_ws_impl(p)
    _add_event_loop(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("connector", help="on-premise connector: dials out to the gateway, serves Parquet datasets",
                       description="Dial out to the gateway, register, and serve the Parquet datasets of --data "
                                   "(a file, or a folder of *.parquet; dataset name = file stem). Reconnects "
                                   "with exponential backoff and jitter; exits 3 if the gateway refuses the token, 4 if a newer "
                                   "connector of the same tenant replaced this one.")
    p.add_argument("--gateway", required=True, action="append",
                   help="ws://HOST:PORT/connect or wss://… (WebSocket tunnel), grpc://HOST:PORT or grpcs://… "
                        "(gRPC tunnel); the scheme picks the transport. For gateway replicas give it several "
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
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S, help="heartbeat interval (default %(default)s)")
    p.add_argument("--ca-file", help="CA bundle to verify a wss:// or grpcs:// gateway")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (poc_connector_*) on this port; off by default; 0 picks one")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default %(default)s)")
    p.add_argument("--batch-bytes", type=int, default=config.BATCH_BYTES,
                   help="target size of each record batch sent (default %(default)s); batches larger than the "
                        "gateway's max_frame_bytes are halved until they fit")
    p.add_argument("--compression", choices=("auto", "always", "off"), default="auto",
                   help="IPC body compression (zstd, else lz4, if the gateway accepts one; docs/protocol.md §4b): "
                        "auto compresses batches on a wide-area link (heartbeat round trip of 2 ms or more) while "
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
    _add_ws_impl(p)
    _add_event_loop(p)
    p.set_defaults(func=cmd_connector)

    p = sub.add_parser("direct", help="direct baseline: the same datasets and delay over plain Flight",
                       description="Serve the Parquet datasets of --data straight over Arrow Flight: the "
                                   "no-tunnel baseline every figure is compared with.")
    p.add_argument("--data", help="Parquet file or folder")
    p.add_argument("--sources", help="YAML file of datasets, as the connector's --sources (databases through ADBC)")
    p.add_argument("--db-connections", type=int, default=config.DB_CONNECTIONS,
                   help="connections to each database of --sources at once (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=config.DIRECT_PORT,
                   help="Flight port (default %(default)s, beside the gateway's 8815 on one host)")
    p.add_argument("--delay-ms", default="200-250", help="simulated delay before each DoGet (default %(default)s)")
    p.add_argument("--tenants", help="tenants YAML: require the same bearer tokens as the gateway")
    p.add_argument("--http-port", type=int, default=-1,
                   help="serve the gateway's HTTP Arrow endpoints and page (/v1/datasets, /v1/query, /ui/) on this "
                        "port too, for browser comparisons; -1 (default) turns it off, 0 picks one")
    _add_cors(p)
    _add_tls(p)
    p.set_defaults(func=cmd_direct)

    p = sub.add_parser("dataset", help="write the seed's table to Parquet",
                       description="Write the seed's table (id int64, value string, amount float64, timestamp) "
                                   "to Parquet; deterministic for a seed; about 50 bytes a row as Arrow IPC.")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows (default %(default)s)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("load", help="load client: N requests over T tenants, timed per phase",
                       description="Run --requests requests, at most --concurrency at a time, round-robin over the "
                                   "first --tenant-count tenants of --tenants; each connects, calls GetFlightInfo, "
                                   "then DoGet, reading and discarding batches. Writes results.json and "
                                   "results.parquet to --out and prints P50/P95/P99 per phase. Exits 1 if every "
                                   "request failed.")
    p.add_argument("--flight", required=True, help="grpc://HOST:PORT (gateway or direct server)")
    p.add_argument("--tenants", required=True, help="tenants YAML (client tokens are read from it)")
    p.add_argument("--requests", type=int, default=1000, help="requests in all (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=100, help="requests at once (default %(default)s)")
    p.add_argument("--tenant-count", type=int, default=5, help="tenants to spread over (default %(default)s)")
    p.add_argument("--dataset", default="sales", help="dataset name (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="per-request deadline; a request past it is a 'timeout' (default %(default)s)")
    p.add_argument("--label", default="tunnel", help="target label stored in each record (default %(default)s)")
    p.add_argument("--ca-file", help="CA bundle for grpc+tls:// servers")
    p.add_argument("--out", required=True, help="folder for results.json and results.parquet")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("bench", help="tunnel vs direct benchmark: throughput ratios, latency, memory, CPU",
                       description="Start a gateway, a connector and a direct server (no artificial delay), then "
                                   "for each repetition measure: aggregate DoGet throughput at each concurrency "
                                   "level, one DoGet alone, GetFlightInfo P50, gateway peak RSS and CPU per GB. "
                                   "Prints each figure's median and spread against its goal.")
    _add_measurement_options(p)
    p.add_argument("--concurrency", default="10,100", help="comma-separated levels (default %(default)s)")
    p.add_argument("--requests", type=int, default=0, help="DoGets per level; 0 = twice the level (default)")
    p.add_argument("--repetitions", type=int, default=3, help="repetitions (default %(default)s)")
    p.add_argument("--single-runs", type=int, default=5, help="lone DoGets per repetition (default %(default)s)")
    p.add_argument("--info-calls", type=int, default=50, help="GetFlightInfo calls per repetition (default %(default)s)")
    p.add_argument("--connector-arg", action="append", help="extra connector argument (repeatable)")
    p.add_argument("--tunnels", default="websocket,grpc",
                   help="tunnel transports to measure against direct in the same run; the first gets the plain "
                        "JSON keys, the others a prefix such as grpc_ (default %(default)s)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="run the experiment notebook with a parameter file (what `make report` does)",
                       description="Execute the notebook named by the parameter file's 'notebook:' key "
                                   "(experiment by default, or resilience) with papermill and the file's "
                                   "parameters; write the executed notebook, report.html, results and charts to "
                                   "OUTPUT_ROOT/<params name>-<time>/.")
    p.add_argument("--params", default="parameters/seed.yaml", help="YAML parameter file (default %(default)s)")
    p.add_argument("--output-root", default="outputs", help="where run folders go (default %(default)s)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("swarm", help="thousands of connectors in one process: idle tunnels to load a gateway",
                       description="Open one registered tunnel for each of the first COUNT tenants of the tenants "
                                   "file (each with its own connector token), each serving a ten-row dataset "
                                   "'tiny', with heartbeats and reconnects as a real connector. Prints a ready line "
                                   "once all are registered; runs until SIGTERM/SIGINT.")
    p.add_argument("--gateway", required=True, help="ws[s]://HOST:PORT/connect or grpc[s]://HOST:PORT")
    p.add_argument("--tenants", required=True, help="the gateway's tenants YAML (connector tokens are read from it)")
    p.add_argument("--count", type=int, default=0, help="tunnels; 0 = one per tenant of the file (default)")
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S,
                   help="heartbeat interval, at most the gateway's (default %(default)s)")
    p.add_argument("--per-second", type=float, default=1000.0,
                   help="tunnels opened per second at start (default %(default)s)")
    p.add_argument("--ca-file", help="CA bundle for wss:// or grpcs:// gateways (default: the system's)")
    _add_ws_impl(p)
    p.set_defaults(func=cmd_swarm)

    p = sub.add_parser("soak", help="clients that abandon their streams, for minutes, on each tunnel transport",
                       description="Start a gateway and connectors per transport; CLIENTS readers loop DoGets, "
                                   "ABANDONING of them leave after the first batch. Prints full reads, abandoned "
                                   "reads, errors, reconnects, streams left and memory growth per process; exits 1 "
                                   "if any transport had an error, a reconnect or a stream left in flight.")
    p.add_argument("--seconds", type=float, default=300.0, help="per transport (default %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent readers (default %(default)s)")
    p.add_argument("--abandoning", type=int, default=2, help="readers that leave after one batch (default %(default)s)")
    p.add_argument("--tenants", type=int, default=2, help="tenants the readers spread over (default %(default)s)")
    _add_measurement_options(p)
    p.add_argument("--transports", default=",".join(("picows", "websockets", "grpc")),
                   help="comma-separated: picows, websockets, grpc (default %(default)s)")
    p.add_argument("--sample-s", type=float, default=5.0, help="memory sample interval (default %(default)s)")
    p.set_defaults(func=cmd_soak)
    return parser


def _hide_tracebacks_from_clients() -> None:
    """pyarrow's Flight server appends a Python error's formatted traceback (file paths, code) to the message
    a client receives; with no frames to format, the client sees the message only (docs/security.md)."""
    sys.tracebacklimit = 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in WORKBOOK_DEPENDENCIES:
            raise
        print(f"error: `{args.command}` is part of the workbook, which needs {exc.name}: "
              "pip install 'poc[workbook]'", file=sys.stderr)
        return 2
