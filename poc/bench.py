"""`python -m poc bench`: tunnel vs direct on the same machine in the same run, figures as ratios."""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow.flight as flight

from .config import make_tenants
from .dataset import dataset_folder
from .runner import Cluster, machine_info

GOALS = {  # figure: (goal, "min" = at least, "max" = at most)
    "ratio_c10": (0.60, "min"),
    "ratio_c100": (0.60, "min"),
    "single_latency_ratio": (1.25, "max"),
    "flightinfo_overhead_ms": (2.0, "max"),
    "gateway_peak_rss_mb": (300.0, "max"),
    "gateway_cpu_s_per_gb": (0.5, "max"),
}
LABELS = {
    "ratio_c10": "aggregate throughput tunnel ÷ direct, 10 concurrent",
    "ratio_c100": "aggregate throughput tunnel ÷ direct, 100 concurrent",
    "single_latency_ratio": "one DoGet alone, tunnel ÷ direct latency",
    "flightinfo_overhead_ms": "GetFlightInfo P50, tunnel − direct (ms)",
    "gateway_peak_rss_mb": "gateway peak RSS, 100 concurrent streams (MB)",
    "gateway_cpu_s_per_gb": "gateway CPU per GB piped (core-seconds)",
}


@dataclass
class BenchParams:
    rows: int = 1_000_000
    concurrency: tuple[int, ...] = (10, 100)
    requests_per_level: int = 0  # 0: twice the concurrency
    single_runs: int = 5
    info_calls: int = 50
    repetitions: int = 3
    data_dir: str = "outputs/data"
    gateway_args: tuple[str, ...] = ()
    connector_args: tuple[str, ...] = ()


@dataclass
class Path_:
    """One Flight endpoint under test and a way to call it."""

    name: str
    uri: str
    token: str
    ticket: flight.Ticket | None = None
    client: flight.FlightClient | None = field(default=None, repr=False)

    def options(self) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {self.token}".encode())], timeout=600)

    def open(self) -> None:
        self.client = flight.connect(self.uri)
        info = self.client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), self.options())
        self.ticket = info.endpoints[0].ticket

    def do_get_bytes(self) -> int:
        reader = self.client.do_get(self.ticket, self.options())
        total = 0
        while True:
            try:
                total += reader.read_chunk().data.nbytes
            except StopIteration:
                return total


def _aggregate_gb_s(path: Path_, concurrency: int, requests: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(lambda _: path.do_get_bytes(), range(requests)))
    return total / 1e9 / (time.perf_counter() - start)


def _single_s(path: Path_, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        path.do_get_bytes()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _info_p50_ms(path: Path_, calls: int) -> float:
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        path.client.get_flight_info(descriptor, path.options())
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class _PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_bench(params: BenchParams, log=print) -> dict:
    """Start gateway, connector and direct server; measure each figure `repetitions` times."""
    data = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(1)
    token = tenants["tenant_001"].client_token
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="poc-bench-") as work, \
            Cluster(work, tenants, data, delay_ms="0", gateway_args=params.gateway_args,
                    connector_args=params.connector_args) as cluster:
        paths = {"direct": Path_("direct", cluster.direct_uri, token), "tunnel": Path_("tunnel", cluster.flight_uri, token)}
        for p in paths.values():
            p.open()
            p.do_get_bytes()  # warm-up
        gateway = psutil.Process(cluster.gateway.pid)
        for rep in range(params.repetitions):
            run: dict = {"repetition": rep}
            for level in params.concurrency:
                requests = params.requests_per_level or 2 * level
                gbs = {}
                for name in ("direct", "tunnel") if rep % 2 == 0 else ("tunnel", "direct"):
                    cpu_before = sum(gateway.cpu_times()[:2])
                    with _PeakRss(gateway.pid) as rss:
                        gbs[name] = _aggregate_gb_s(paths[name], level, requests)
                    if name == "tunnel":
                        cpu = sum(gateway.cpu_times()[:2]) - cpu_before
                        piped_gb = requests * params.rows * 50 / 1e9
                        run[f"gateway_peak_rss_mb_c{level}"] = rss.peak / 2**20
                        run[f"gateway_cpu_s_per_gb_c{level}"] = cpu / piped_gb
                run[f"direct_gb_s_c{level}"] = gbs["direct"]
                run[f"tunnel_gb_s_c{level}"] = gbs["tunnel"]
                run[f"ratio_c{level}"] = gbs["tunnel"] / gbs["direct"]
                log(f"rep {rep} c{level}: direct {gbs['direct']:.2f} GB/s, tunnel {gbs['tunnel']:.2f} GB/s, "
                    f"ratio {run[f'ratio_c{level}']:.2f}")
            single = {name: _single_s(p, params.single_runs) for name, p in paths.items()}
            run["direct_single_ms"], run["tunnel_single_ms"] = single["direct"] * 1000, single["tunnel"] * 1000
            run["single_latency_ratio"] = single["tunnel"] / single["direct"]
            info = {name: _info_p50_ms(p, params.info_calls) for name, p in paths.items()}
            run["direct_flightinfo_p50_ms"], run["tunnel_flightinfo_p50_ms"] = info["direct"], info["tunnel"]
            run["flightinfo_overhead_ms"] = info["tunnel"] - info["direct"]
            top = max(params.concurrency)
            run["gateway_peak_rss_mb"] = run[f"gateway_peak_rss_mb_c{top}"]
            run["gateway_cpu_s_per_gb"] = statistics.median(run[f"gateway_cpu_s_per_gb_c{c}"] for c in params.concurrency)
            log(f"rep {rep}: single {run['direct_single_ms']:.0f} vs {run['tunnel_single_ms']:.0f} ms, "
                f"flightinfo +{run['flightinfo_overhead_ms']:.2f} ms, gateway peak {run['gateway_peak_rss_mb']:.0f} MB")
            runs.append(run)
        for p in paths.values():
            p.client.close()
    return summarize(runs, params)


def summarize(runs: list[dict], params: BenchParams) -> dict:
    figures = {}
    for key in GOALS:
        values = [r[key] for r in runs if key in r]
        if values:
            figures[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    for key in runs[0]:
        if key not in figures and key != "repetition":
            values = [r[key] for r in runs]
            figures[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    result = {key: figures[key]["median"] for key in GOALS if key in figures}
    result.update({"figures": figures, "runs": runs, "params": asdict(params), "machine": machine_info()})
    return result


def table(result: dict) -> str:
    lines = [f"{'figure':<52}{'median':>10}{'spread':>20}{'goal':>10}  met",
             "-" * 98]
    for key, (goal, kind) in GOALS.items():
        f = result["figures"].get(key)
        if f is None:
            continue
        met = f["median"] >= goal if kind == "min" else f["median"] <= goal
        sign = "≥" if kind == "min" else "≤"
        spread = f"{f['min']:.2f}–{f['max']:.2f}"
        lines.append(f"{LABELS[key]:<52}{f['median']:>10.2f}{spread:>20}"
                     f"{sign + format(goal, 'g'):>10}  {'yes' if met else 'NO'}")
    fig = result["figures"]
    for level in result["params"]["concurrency"]:
        d, t = fig.get(f"direct_gb_s_c{level}"), fig.get(f"tunnel_gb_s_c{level}")
        if d and t:
            lines.append(f"  c{level}: direct {d['median']:.2f} GB/s, tunnel {t['median']:.2f} GB/s")
    if "direct_single_ms" in fig:
        lines.append(f"  single DoGet: direct {fig['direct_single_ms']['median']:.0f} ms, "
                     f"tunnel {fig['tunnel_single_ms']['median']:.0f} ms; GetFlightInfo P50: direct "
                     f"{fig['direct_flightinfo_p50_ms']['median']:.2f} ms, tunnel {fig['tunnel_flightinfo_p50_ms']['median']:.2f} ms")
    lines.append(f"machine: {result['machine']['label']}; {len(result['runs'])} repetitions")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))
