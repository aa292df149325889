"""Throughput of the HTTP Arrow endpoint (`GET /v1/datasets/{name}`), through the tunnel and from the direct server.

    python -m poc.workbook.experiments.http_throughput [--rows 1000000] [--runs 7] [--concurrency 1,4]

Starts a gateway, one connector and a direct server (no artificial delay) on loopback, reads the dataset's Arrow
IPC stream whole with a plain HTTP client — `runs` times one at a time, then `runs` rounds of `concurrency`
readers at once — alternating tunnel and direct, and prints the median MB/s of each with its spread and the
tunnel ÷ direct ratio. Every body is checked to be the whole stream.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from ...config import make_tenants
from ..dataset import dataset_folder
from ..servers.runner import Cluster, at_once


def fetch(port: int, token: str, name: str = "sales") -> int:
    """One whole IPC stream over HTTP; its size in bytes (its batches are counted to be sure it is whole)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", f"/v1/datasets/{name}", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    pa.ipc.open_stream(body).read_all()  # raises on a cut stream
    return len(body)


def round_mb_s(port: int, token: str, concurrency: int) -> float:
    """`concurrency` readers at once; all their bytes over the wall time, MB/s."""
    sizes: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            sizes.append(fetch(port, token))
        except BaseException as exc:  # noqa: BLE001 (raised below)
            errors.append(exc)

    started = time.perf_counter()
    at_once(one, concurrency)
    if errors or len(sizes) != concurrency:
        raise RuntimeError(f"a read failed: {errors[:1]}")
    return sum(sizes) / (time.perf_counter() - started) / 1e6


def measure(rows: int, runs: int, levels: list[int], data_dir: str = "outputs/data") -> dict:
    tenants = make_tenants(1)
    token = tenants["tenant_001"].client_token
    results: dict = {"rows": rows, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="poc-http-") as work, \
            Cluster(work, tenants, dataset_folder(data_dir, rows), delay_ms="0") as cluster:
        ports = {"tunnel": cluster.gateway.ready["http_port"], "direct": cluster.components["direct"].ready["http_port"]}
        for port in ports.values():
            fetch(port, token)  # warm-up
        for level in levels:
            samples: dict[str, list[float]] = {"tunnel": [], "direct": []}
            for run in range(runs):
                for path in (("tunnel", "direct") if run % 2 == 0 else ("direct", "tunnel")):
                    samples[path].append(round_mb_s(ports[path], token, level))
            for path, values in samples.items():
                results[f"{path}_c{level}_mb_s"] = round(statistics.median(values), 1)
                results[f"{path}_c{level}_spread"] = [round(min(values), 1), round(max(values), 1)]
            results[f"ratio_c{level}"] = round(results[f"tunnel_c{level}_mb_s"] / results[f"direct_c{level}_mb_s"], 3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poc.workbook.experiments.http_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the dataset (default %(default)s)")
    parser.add_argument("--runs", type=int, default=7, help="reads (or rounds) per path and level (default %(default)s)")
    parser.add_argument("--concurrency", default="1,4", help="readers at once, comma-separated (default %(default)s)")
    parser.add_argument("--data-dir", default="outputs/data", help="where the dataset is made or reused")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = measure(args.rows, args.runs, [int(c) for c in args.concurrency.split(",") if c], args.data_dir)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
