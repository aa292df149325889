"""`python -m poc direct`: the direct baseline, plain Flight over the same data."""

from __future__ import annotations

import argparse

from .. import config
from .common import add_cors, add_tls, check_tls, hide_tracebacks_from_clients, serve_flight


def add(sub) -> None:
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
    add_cors(p)
    add_tls(p)
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from ..auth import flight_certificate
    from ..direct import DirectFlightServer
    from ..sources import load_data

    check_tls(args)
    hide_tracebacks_from_clients()
    tenants = config.load_tenants(args.tenants) if args.tenants else None
    scheme, tls = ("grpc+tls", [flight_certificate(args.tls_cert, args.tls_key)]) if args.tls_cert else ("grpc", None)
    sources = load_data(args.data, args.sources)
    server = DirectFlightServer(f"{scheme}://{args.host}:{args.port}", sources, tenants,
                                config.parse_delay(args.delay_ms), db_connections=args.db_connections,
                                tls_certificates=tls)
    ports = {"flight_port": server.port}
    if args.http_port >= 0:
        from ..http_arrow import default_vendor_dir, serve_arrow

        http = serve_arrow((args.host, args.http_port),
                           server.arrow_http(tuple(args.cors_origin or ()), default_vendor_dir()))
        ports["http_port"] = http.server_address[1]
    serve_flight(server, "direct", **ports)
    return 0


