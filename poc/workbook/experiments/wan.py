"""The WAN experiment (`run_wan`, notebooks/wan.ipynb): a grid of round-trip times × bandwidths × compression ×
window policy, each cell with a fresh gateway and connector whose tunnel crosses an emulated hop
(poc.workbook.emulation.wan), against a direct Flight server whose clients cross an identical hop, in the same
network namespace and run.

    python -m poc.workbook.experiments.wan run --params PARAMS.json --out FIGURES.json   # inside the namespace
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..emulation.wan import (LinkSpec, WanHop, experiment_main, prepare_namespace, run_experiment_in_namespace,
                             start_relay)
from ..params import RunParams

# ----------------------------------------------------------------------------- the experiment

def _floats(text: str | float | int | list) -> list[float]:
    if isinstance(text, (list, tuple)):
        return [float(x) for x in text]
    return [float(x) for x in str(text).split(",") if x.strip()]


def _words(text: str | list) -> list[str]:
    return list(text) if isinstance(text, (list, tuple)) else [x.strip() for x in str(text).split(",") if x.strip()]


@dataclass
class WanParams(RunParams):
    """The wan notebook's parameters (parameters/wan.yaml names only what differs)."""

    RUN_PREFIX = "wan"

    rows: int = 1_000_000          # the table every DoGet reads (about 50 MB of Arrow IPC, as the seed's)
    rtt_ms: str = "0,100"          # round trips of the connector-gateway hop (the direct baseline's too)
    mbps: str = "50,500,0"         # its bandwidth each way; 0: not shaped
    compression: str = "off,auto"  # connector --compression per cell
    windows: str = "fixed,adaptive"  # gateway --window-policy per cell
    client_rtt_ms: float = 0.0     # the client-server hop (both paths cross it)
    client_mbps: float = 0.0
    batch_bytes: int = 0           # connector --batch-bytes; 0: its default (2 MiB)
    streams: int = 4               # concurrent DoGets of the loaded phase
    single_runs: int = 2           # lone DoGets per path and cell (median)
    info_interval_s: float = 0.05  # GetFlightInfo probes while the loaded phase runs
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        from ...config import ConfigError

        try:
            for rtt, mbps in itertools.product(_floats(self.rtt_ms), _floats(self.mbps)):
                LinkSpec(rtt, mbps)
            LinkSpec(self.client_rtt_ms, self.client_mbps)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if set(_words(self.compression)) - {"off", "auto", "always"} or set(_words(self.windows)) - {"fixed",
                                                                                                    "adaptive"}:
            raise ConfigError("compression takes off/auto/always and windows fixed/adaptive, comma-separated")
        if self.rows < 1 or self.streams < 1 or self.single_runs < 1 or self.batch_bytes < 0:
            raise ConfigError("rows, streams and single_runs must be at least 1, batch_bytes at least 0")
        super().__post_init__()

    def cells(self) -> list[tuple[LinkSpec, str, str]]:
        return [(LinkSpec(r, m), c, w) for r, m, c, w in itertools.product(
            _floats(self.rtt_ms), _floats(self.mbps), _words(self.compression), _words(self.windows))]


def _read(client, ticket, options) -> int:
    from ..load.client import read_stream

    return read_stream(client.do_get(ticket, options))[0]


def measure_path(uri: str, token: str, params: WanParams) -> dict:
    """One path (tunnel or direct) across its hops: lone DoGets, then `streams` at once with GetFlightInfo
    probes running beside them. Rates are of Arrow IPC bytes delivered (what the client gets)."""
    import pyarrow.flight as flight

    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())],
                                       timeout=params.timeout_s)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    with flight.connect(uri) as client:
        info = client.get_flight_info(descriptor, options)
        size, ticket = info.total_bytes, info.endpoints[0].ticket

        def probe_ms() -> float:
            start = time.perf_counter()
            client.get_flight_info(descriptor, options)
            return (time.perf_counter() - start) * 1000

        idle_info = statistics.median(probe_ms() for _ in range(5))
        singles = []
        for _ in range(params.single_runs):
            start = time.perf_counter()
            rows = _read(client, ticket, options)
            singles.append(time.perf_counter() - start)
            if rows != info.total_records:
                raise RuntimeError(f"short stream: {rows} of {info.total_records} rows")
        probes: list[float] = []
        loaded = threading.Event()

        def probe() -> None:
            """From the load's start to its end (at least one probe, however short the load)."""
            while True:
                try:
                    probes.append(probe_ms())
                except Exception:  # the loaded phase failed: its own error is the one reported
                    return
                if loaded.wait(params.info_interval_s):
                    return

        def one(_) -> float:
            with flight.connect(uri) as own:
                start = time.perf_counter()
                rows = _read(own, ticket, options)
                if rows != info.total_records:
                    raise RuntimeError(f"short stream: {rows} of {info.total_records} rows")
                return time.perf_counter() - start

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(params.streams) as pool:
            durations = list(pool.map(one, range(params.streams)))
        elapsed = time.perf_counter() - start
        loaded.set()
        prober.join()
    mbit = size * 8 / 1e6
    per_stream = [mbit / d for d in durations]
    return {"ipc_mbit": mbit, "single_mbps": mbit / statistics.median(singles),
            "aggregate_mbps": mbit * params.streams / elapsed, "stream_min_mbps": min(per_stream),
            "stream_max_mbps": max(per_stream), "info_idle_p50_ms": idle_info,
            "info_loaded_p50_ms": statistics.median(probes) if probes else None, "info_probes": len(probes)}


def _emulator_check(data: Path, work: Path, log) -> dict:
    """What the relay costs unshaped: one direct DoGet's rate with and without a relay of 0 ms in front."""
    from ...config import make_tenants
    from ..servers.runner import Cluster

    tenants = make_tenants(1)
    token = next(iter(tenants.values())).client_token
    params = WanParams(streams=4, single_runs=3, rows=1)
    with Cluster(work / "check", tenants, data, with_connectors=False) as cluster:
        port = cluster.components["direct"].ready["flight_port"]
        plain = measure_path(f"grpc://127.0.0.1:{port}", token, params)
        proc, relay_port = start_relay(port, 0.0)
        try:
            relayed = measure_path(f"grpc://127.0.0.1:{relay_port}", token, params)
        finally:
            proc.terminate()
            proc.wait()
    check = {"plain_single_mbps": plain["single_mbps"], "relayed_single_mbps": relayed["single_mbps"],
             "plain_aggregate_mbps": plain["aggregate_mbps"], "relayed_aggregate_mbps": relayed["aggregate_mbps"]}
    log(f"emulator check: direct DoGet {plain['single_mbps']:,.0f} Mbit/s plain, {relayed['single_mbps']:,.0f} "
        "through the relay")
    return check


def run_cells(params: WanParams, log=print) -> dict:
    """The grid, inside a network namespace of our own (see run_wan): returns rows of figures."""
    from ...config import make_tenants
    from ..dataset import dataset_folder
    from ..servers.runner import Cluster

    prepare_namespace()
    data = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(1)
    creds = next(iter(tenants.values()))
    client_spec = LinkSpec(params.client_rtt_ms, params.client_mbps)
    rows: list[dict] = []
    direct_done: set[tuple[float, float]] = set()
    with tempfile.TemporaryDirectory(prefix="poc-wan-") as work:
        check = _emulator_check(data, Path(work), log)
        for n, (spec, compression, windows) in enumerate(params.cells()):
            cell = {"rtt_ms": spec.rtt_ms, "mbps": spec.mbps, "compression": compression, "windows": windows}
            with Cluster(Path(work) / f"cell{n}", tenants, data, delay_ms="0",
                         gateway_args=("--window-policy", windows, "--request-timeout-s", str(params.timeout_s)),
                         connector_args=("--compression", compression,
                                         *(("--batch-bytes", str(params.batch_bytes)) if params.batch_bytes else ())),
                         with_connectors=False) as cluster:
                ready = cluster.gateway.ready
                hops = [WanHop(ready["ws_port"], spec), WanHop(ready["flight_port"], client_spec)]
                try:
                    cluster.start_connector(creds.tenant_id, url=f"ws://127.0.0.1:{hops[0].port}/connect")
                    cluster.wait_online([creds.tenant_id], timeout=60)
                    tunnel = measure_path(f"grpc://127.0.0.1:{hops[1].port}", creds.client_token, params)
                    link = cluster.health()["tenants"][creds.tenant_id]
                    rows.append({**cell, "path": "tunnel", **tunnel, "rtt_measured_ms": link.get("rtt_ms"),
                                 "window_target": link.get("window_target"), "codec": link.get("codec")})
                    info = tunnel["info_loaded_p50_ms"]
                    log(f"{spec.label()}, compression {compression}, {windows} windows: tunnel "
                        f"{tunnel['single_mbps']:,.0f} Mbit/s alone, {tunnel['aggregate_mbps']:,.0f} with "
                        f"{params.streams}, GetFlightInfo under load "
                        + ("not probed (the load was over first)" if info is None else f"{info:.1f} ms"))
                    if (spec.rtt_ms, spec.mbps) not in direct_done:
                        direct_done.add((spec.rtt_ms, spec.mbps))
                        hops.append(WanHop(cluster.components["direct"].ready["flight_port"], spec))
                        hops.append(WanHop(hops[-1].port, client_spec))
                        direct = measure_path(f"grpc://127.0.0.1:{hops[-1].port}", creds.client_token, params)
                        rows.append({"rtt_ms": spec.rtt_ms, "mbps": spec.mbps, "compression": "-",
                                     "windows": "-", "path": "direct", **direct})
                        log(f"{spec.label()}: direct {direct['single_mbps']:,.0f} Mbit/s alone, "
                            f"{direct['aggregate_mbps']:,.0f} with {params.streams}")
                finally:
                    for hop in reversed(hops):
                        hop.close()
    return {"rows": rows, "emulator": check}


def run_wan(params: WanParams, progress=print) -> "WanResult":
    """Run the grid in a new network namespace (the shaping never touches the host's own loopback) and read
    its figures back; progress lines are passed on as they come."""
    import polars as pl

    from ..servers.runner import machine_info

    doc = run_experiment_in_namespace(__name__, params, "wan", progress)
    result = WanResult(params, pl.DataFrame(doc["rows"]), doc["emulator"], machine_info())
    result.table().write_csv(params.out_dir / "wan.csv")
    return result


@dataclass
class WanResult:
    params: WanParams
    rows: "object"  # polars DataFrame: one row per path and cell
    emulator: dict
    machine: dict

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir

    def table(self):
        """Tunnel cells beside the direct path across the same hop: rates and their ratio to direct."""
        import polars as pl

        r = self.rows
        direct = r.filter(pl.col("path") == "direct").select(
            "rtt_ms", "mbps", pl.col("single_mbps").alias("direct_single_mbps"),
            pl.col("aggregate_mbps").alias("direct_aggregate_mbps"),
            pl.col("info_loaded_p50_ms").alias("direct_info_loaded_p50_ms"))
        tunnel = r.filter(pl.col("path") == "tunnel").join(direct, on=["rtt_ms", "mbps"], how="left")
        return tunnel.with_columns(
            (pl.col("single_mbps") / pl.col("direct_single_mbps")).alias("single_vs_direct"),
            (pl.col("aggregate_mbps") / pl.col("direct_aggregate_mbps")).alias("aggregate_vs_direct"),
            (pl.col("info_loaded_p50_ms") - pl.col("direct_info_loaded_p50_ms")).alias("info_added_ms"),
            (pl.col("stream_max_mbps") / pl.col("stream_min_mbps")).alias("stream_spread"),
            pl.when(pl.col("mbps") > 0).then(pl.col("single_mbps") / pl.col("mbps")).alias("single_of_link"))


def answer(result: WanResult) -> str:
    """The report's first lines: the window goal, what compression buys, what the tunnel costs on each link."""
    import polars as pl

    from ..report.present import number

    t = result.table()
    lines = []
    goal = t.filter((pl.col("rtt_ms") == 100) & (pl.col("mbps") == 500))
    if goal.height:
        best = {w: goal.filter((pl.col("windows") == w) & (pl.col("compression") == "off"))["single_of_link"].max()
                for w in ("fixed", "adaptive")}
        a = best.get("adaptive")
        lines.append(f"**Answer: one stream over 500 Mbit/s at 100 ms reaches "
                     f"{'—' if a is None else f'{a:.0%}'} of the link with adaptive windows "
                     f"({'—' if best.get('fixed') is None else format(best['fixed'], '.0%')} with fixed 8 MiB "
                     f"windows; goal ≥ 80 %, uncompressed).**")
    else:
        lines.append("**Answer:** the grid has no 100 ms × 500 Mbit/s cell, the window goal's.")
    for spec in t.select("rtt_ms", "mbps").unique().sort("mbps", "rtt_ms").iter_rows(named=True):
        cell = t.filter((pl.col("rtt_ms") == spec["rtt_ms"]) & (pl.col("mbps") == spec["mbps"]))
        top = cell.sort("aggregate_mbps", descending=True).row(0, named=True)
        bandwidth = f"{number(spec['mbps'])} Mbit/s" if spec["mbps"] else "unshaped"
        lines.append(f"- {number(spec['rtt_ms'])} ms, {bandwidth}: best tunnel setting compression "
                     f"{top['compression']}, {top['windows']} windows — {number(top['aggregate_mbps'])} Mbit/s with "
                     f"{result.params.streams} streams ({number(top['aggregate_vs_direct'])}× direct), one stream "
                     f"{number(top['single_mbps'])} Mbit/s ({number(top['single_vs_direct'])}× direct); "
                     f"GetFlightInfo under load {number(top['info_added_ms'])} ms over direct.")
    e = result.emulator
    lines.append(f"- The emulator is not the bound: a direct DoGet through an unshaped relay moved "
                 f"{number(e['relayed_single_mbps'])} Mbit/s against {number(e['plain_single_mbps'])} without it.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    experiment_main(argv, "poc.workbook.experiments.wan", __doc__, WanParams, run_cells)


if __name__ == "__main__":
    main()
