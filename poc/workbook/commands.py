"""The workbook's commands (`python -m poc dataset | load | bench | relay | soak | swarm | report`), added to the product's
command line through the `poc.commands` entry points of pyproject.toml: the product imports nothing of the
workbook, and an install without the workbook's dependencies does not list them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading

from .. import config
from ..cli.common import add_ws_impl, emit_ready, serve_flight, stop_event_for_signals
from ..config import ConfigError


def _require_the_workbook() -> None:
    """ModuleNotFoundError naming the first dependency of the workbook (pyproject.toml's [workbook] extra) that is
    not installed: the product's command line then leaves these commands out, and says what to install."""
    import importlib.metadata
    import re

    for requirement in importlib.metadata.requires("poc") or []:
        if 'extra == "workbook"' in requirement.replace("'", '"'):
            name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise ModuleNotFoundError(f"the workbook needs {name}", name=name) from None


_require_the_workbook()


def add_measurement_options(p: argparse.ArgumentParser) -> None:
    """What `bench` and `soak` share: the table, where it is kept, gateway options, the JSON output."""
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the table (default %(default)s)")
    p.add_argument("--data-dir", default="outputs/data", help="where the dataset is made or reused")
    p.add_argument("--gateway-arg", action="append", help="extra gateway argument (repeatable)")
    p.add_argument("--json", help="also write the figures, raw runs and the machine to this file")



def cmd_dataset(args: argparse.Namespace) -> int:
    from .dataset import write_dataset

    path = write_dataset(args.rows, args.out, args.seed)
    print(json.dumps({"path": str(path), "rows": args.rows, "bytes": path.stat().st_size}))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .load.client import LoadConfig, records_as_dicts, run_load
    from .load.metrics import summarize, to_frame

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
    from .experiments.bench import BenchParams, run_bench, table, write_json

    levels = tuple(int(x) for x in args.concurrency.split(","))
    from .servers.runner import TUNNEL_PORTS

    tunnels = tuple(t.strip() for t in args.tunnels.split(","))
    if not tunnels or set(tunnels) - set(TUNNEL_PORTS) or len(set(tunnels)) != len(tunnels):
        raise ConfigError(f"--tunnels takes {', '.join(TUNNEL_PORTS)}, comma-separated; got {args.tunnels!r}")
    if args.repetitions < 1 or args.rows < 1 or not levels or min(levels) < 1:
        raise ConfigError("--rows, --repetitions and every --concurrency level must be >= 1")
    params = BenchParams(rows=args.rows, concurrency=levels, requests_per_level=args.requests,
                         single_runs=args.single_runs, info_calls=args.info_calls, repetitions=args.repetitions,
                         data_dir=args.data_dir, gateway_args=tuple(args.gateway_arg or ()),
                         connector_args=tuple(args.connector_arg or ()), tunnels=tunnels,
                         reference=not args.no_reference)
    import pyarrow as pa

    from .servers.runner import ComponentError

    try:
        result = run_bench(params, log=lambda line: print(line, file=sys.stderr, flush=True))
    except (pa.ArrowException, ComponentError) as exc:  # a setting the run cannot use: the refusal says which
        what = "a DoGet failed" if isinstance(exc, pa.ArrowException) else "a server did not start"
        print(f"bench stopped: {what}: {str(exc).strip().splitlines()[-1][:400]}", file=sys.stderr)
        return 1
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"figures and raw runs: {args.json}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from .experiments.soak import TRANSPORTS, SoakParams, passed, run_soak, table, write_json

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
    from .load.swarm import Swarm

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
            emit_ready(component="swarm", pid=os.getpid(), tunnels=total)
        logging.getLogger("poc.swarm").info("%d of %d tunnels registered", done, total)

    async def main() -> None:
        stop = stop_event_for_signals(asyncio.get_running_loop())
        await swarm.run(stop, progress)

    asyncio.run(main())
    for failure in swarm.failed[:10]:
        logging.getLogger("poc.swarm").error("%s", failure)
    return 0 if not swarm.failed else 3


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import run_report

    out = run_report(args.params, args.output_root)
    print(f"report: {out / 'report.html'}")
    print(f"executed notebook, results, charts and machine info: {out}/")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from .servers.flight_relay import FlightRelay

    relay = FlightRelay(f"grpc://{args.host}:{args.port}", args.upstream)
    serve_flight(relay, "relay", flight_port=relay.port)
    return 0


# -- each command's parser: one entry point each (pyproject.toml, [project.entry-points."poc.commands"])


def add_dataset(sub) -> None:
    """The `dataset` command."""
    p = sub.add_parser("dataset", help="write the seed's table to Parquet",
                       description="Write the seed's table (id int64, value string, amount float64, timestamp) "
                                   "to Parquet; deterministic for a seed; about 50 bytes a row as Arrow IPC.")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows (default %(default)s)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    p.set_defaults(func=cmd_dataset)


def add_load(sub) -> None:
    """The `load` command."""
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


def add_bench(sub) -> None:
    """The `bench` command."""
    p = sub.add_parser("bench", help="tunnel vs direct benchmark: throughput ratios, latency, memory, CPU",
                       description="Start a gateway, a connector and a direct server (no artificial delay), then "
                                   "for each repetition measure: aggregate DoGet throughput at each concurrency "
                                   "level, one DoGet alone, GetFlightInfo P50, gateway peak RSS, and the CPU each "
                                   "process (direct server, connector, gateway, this load client) spends per GB "
                                   "delivered on each path. Prints each figure's median and spread against its "
                                   "goal, where the core-seconds go, and the two-hop limit of tunnel ÷ direct "
                                   "computed from them; beside them, a plain Flight relay in front of the direct "
                                   "server (`python -m poc relay`: batches relayed in C++, no checks), the "
                                   "reference for what any two-hop path costs with these libraries. Warns when a "
                                   "connector turned compression on during the run (its gateway figures then "
                                   "include decompressing).")
    add_measurement_options(p)
    p.add_argument("--concurrency", default="10,100", help="comma-separated levels (default %(default)s)")
    p.add_argument("--requests", type=int, default=0, help="DoGets per level; 0 = twice the level (default)")
    p.add_argument("--repetitions", type=int, default=3, help="repetitions (default %(default)s)")
    p.add_argument("--single-runs", type=int, default=5, help="lone DoGets per repetition (default %(default)s)")
    p.add_argument("--info-calls", type=int, default=50, help="GetFlightInfo calls per repetition (default %(default)s)")
    p.add_argument("--connector-arg", action="append", help="extra connector argument (repeatable)")
    p.add_argument("--no-reference", action="store_true", help="leave out the plain Flight relay")
    p.add_argument("--tunnels", default="websocket,flight",
                   help="tunnel transports to measure against direct in the same run (websocket, flight); "
                        "the first gets the plain JSON keys, the others a prefix such as flight_ (default "
                        "%(default)s)")
    p.set_defaults(func=cmd_bench)


def add_report(sub) -> None:
    """The `report` command."""
    p = sub.add_parser("report", help="run the experiment notebook with a parameter file (what `make report` does)",
                       description="Execute the notebook named by the parameter file's 'notebook:' key "
                                   "(experiment by default, or resilience) with papermill and the file's "
                                   "parameters; write the executed notebook, report.html, results and charts to "
                                   "OUTPUT_ROOT/<params name>-<time>/.")
    p.add_argument("--params", default="parameters/seed.yaml", help="YAML parameter file (default %(default)s)")
    p.add_argument("--output-root", default="outputs", help="where run folders go (default %(default)s)")
    p.set_defaults(func=cmd_report)


def add_swarm(sub) -> None:
    """The `swarm` command."""
    p = sub.add_parser("swarm", help="thousands of connectors in one process: idle tunnels to load a gateway",
                       description="Open one registered tunnel for each of the first COUNT tenants of the tenants "
                                   "file (each with its own connector token), each serving a ten-row dataset "
                                   "'tiny', with heartbeats and reconnects as a real connector. Prints a ready line "
                                   "once all are registered; runs until SIGTERM/SIGINT.")
    p.add_argument("--gateway", required=True,
                   help="ws[s]://HOST:PORT/connect or flight[+tls]://HOST:PORT")
    p.add_argument("--tenants", required=True, help="the gateway's tenants YAML (connector tokens are read from it)")
    p.add_argument("--count", type=int, default=0, help="tunnels; 0 = one per tenant of the file (default)")
    p.add_argument("--heartbeat-s", type=float, default=config.HEARTBEAT_S,
                   help="heartbeat interval, at most the gateway's (default %(default)s)")
    p.add_argument("--per-second", type=float, default=1000.0,
                   help="tunnels opened per second at start (default %(default)s)")
    p.add_argument("--ca-file", help="CA bundle for wss:// or flight+tls:// gateways (default: the system's)")
    add_ws_impl(p)
    p.set_defaults(func=cmd_swarm)


def add_soak(sub) -> None:
    """The `soak` command."""
    p = sub.add_parser("soak", help="clients that abandon their streams, for minutes, on each tunnel transport",
                       description="Start a gateway and connectors per transport; CLIENTS readers loop DoGets, "
                                   "ABANDONING of them leave after the first batch. Prints full reads, abandoned "
                                   "reads, errors, reconnects, streams left and memory growth per process; exits 1 "
                                   "if any transport had an error, a reconnect or a stream left in flight.")
    p.add_argument("--seconds", type=float, default=300.0, help="per transport (default %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent readers (default %(default)s)")
    p.add_argument("--abandoning", type=int, default=2, help="readers that leave after one batch (default %(default)s)")
    p.add_argument("--tenants", type=int, default=2, help="tenants the readers spread over (default %(default)s)")
    add_measurement_options(p)
    from .experiments.soak import TRANSPORTS as SOAK_TRANSPORTS

    p.add_argument("--transports", default=",".join(SOAK_TRANSPORTS),
                   help=f"comma-separated: {', '.join(SOAK_TRANSPORTS)} (default %(default)s)")
    p.add_argument("--sample-s", type=float, default=5.0, help="memory sample interval (default %(default)s)")
    p.set_defaults(func=cmd_soak)


def add_relay(sub) -> None:
    """The `relay` command."""
    p = sub.add_parser("relay", help="a plain Flight relay: the bench's reference for a two-hop path",
                       description="Serve Arrow Flight and answer GetFlightInfo and DoGet by making the same call "
                                   "to --upstream (its authorization header passed on), batches relayed in C++ "
                                   "with no checks: what a two-hop path costs at the least with pyarrow's Flight. "
                                   "`bench` starts one beside the tunnels. Prints a JSON ready line with its port.")
    p.add_argument("--upstream", required=True, help="grpc://HOST:PORT of the Flight server to relay")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port to serve on; 0 picks a free one (default)")
    p.set_defaults(func=cmd_relay)
