"""What strangers can make a gateway hold before they authenticate, measured as its peak RSS (VmHWM).

    python -m poc.workbook.experiments.preauth [--flight-mib 256] [--flight-parallel 1,4] [--pending 300]

- Flight: unauthenticated DoGets whose ticket is `--flight-mib` MiB, `--flight-parallel` at once. pyarrow's
  server reads a request whole before its middleware can refuse it (docs/security.md).
- Tunnel port: `--pending` WebSocket connections that never register, each holding an unfinished text
  message just under the gateway's message limit, for the register timeout.

Prints one line per case and, with --json, writes them. Every connection is on loopback to a gateway this
command starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.flight as flight

from ...config import MAX_MESSAGE_BYTES, make_tenants
from ..dataset import dataset_folder
from ..servers.runner import Cluster, at_once, peak_rss, reset_peak_rss


def flight_case(cluster: Cluster, mib: int, parallel: int) -> dict:
    """`parallel` unauthenticated DoGets of a `mib` MiB ticket at once: the gateway's peak RSS growth."""
    base = reset_peak_rss(cluster.gateway.pid)
    outcomes: list[str] = []

    def one() -> None:
        try:
            with flight.connect(cluster.flight_uri) as client:
                client.do_get(flight.Ticket(b"x" * (mib << 20)), flight.FlightCallOptions(timeout=120)).read_all()
            outcomes.append("served")
        except flight.FlightUnauthenticatedError:
            outcomes.append("refused: unauthenticated")
        except Exception as exc:  # noqa: BLE001 (reported)
            outcomes.append(type(exc).__name__)

    started = time.monotonic()
    at_once(one, parallel)
    return {"case": "flight", "mib": mib, "parallel": parallel, "seconds": round(time.monotonic() - started, 1),
            "peak_growth_mib": round((peak_rss(cluster.gateway.pid) - base) / 2**20), "outcomes": dict(Counter(outcomes))}


def pending_case(cluster: Cluster, count: int, hold_s: float = 12.0) -> dict:
    """`count` WebSocket tunnels that never register, each sending an unfinished text message of almost
    --max-message-bytes: the gateway's peak RSS growth, and how many it held or closed."""
    from websockets.asyncio.client import connect

    base = reset_peak_rss(cluster.gateway.pid)
    piece = 64 << 10
    pieces = max(1, MAX_MESSAGE_BYTES // piece - 1)

    async def one() -> str:
        try:
            async with connect(cluster.websocket_url, max_size=None, compression=None, open_timeout=30) as ws:
                async def fragments():
                    for _ in range(pieces):
                        yield "x" * piece
                    await asyncio.sleep(hold_s * 3)  # the message never ends
                    yield "x"
                await asyncio.wait_for(ws.send(fragments()), hold_s)
                return "held"
        except TimeoutError:
            return "held"
        except Exception as exc:  # noqa: BLE001 (closed by the gateway: reported)
            code = getattr(getattr(exc, "rcvd", None), "code", None)
            return f"closed {code}" if code else type(exc).__name__

    async def every() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(count)))

    outcomes = asyncio.run(every())
    return {"case": "pending tunnels", "count": count, "message_bytes": pieces * piece,
            "peak_growth_mib": round((peak_rss(cluster.gateway.pid) - base) / 2**20), "outcomes": dict(Counter(outcomes))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poc.workbook.experiments.preauth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flight-mib", type=int, default=256, help="size of each unauthenticated ticket (MiB)")
    parser.add_argument("--flight-parallel", default="1,4", help="unauthenticated calls at once, comma-separated")
    parser.add_argument("--pending", type=int, default=300, help="tunnels that never register")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra gateway argument (repeatable)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="poc-preauth-") as work, \
            Cluster(work, make_tenants(1), dataset_folder("outputs/data", 20_000), with_direct=False,
                    gateway_args=tuple(args.gateway_arg)) as cluster:
        for parallel in (int(p) for p in args.flight_parallel.split(",") if p):
            results.append(flight_case(cluster, args.flight_mib, parallel))
            print(results[-1], flush=True)
        if args.pending:
            results.append(pending_case(cluster, args.pending))
            print(results[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
