"""WAN emulation on loopback: a delaying relay in user space, bandwidth from `tc` in a private namespace.

This kernel has no `netem`, so latency comes from a relay process that holds every chunk it reads for half
the round trip before passing it on (each direction), and bandwidth from an `htb` class on the loopback
device of a network namespace the run creates itself (`unshare --net`), matched by the relay's port: the
sender's bytes are paced by the kernel into the relay, which delays them, like a bottleneck link followed
by its propagation delay. Nothing here touches the host's own network: shaping refuses to run outside a
namespace this module made (`in_private_namespace`).

    python -m poc.workbook.wan relay --target 127.0.0.1:8443 --rtt-ms 100     # prints the port it listens on

The WAN experiment (`run_wan`, notebooks/wan.ipynb) runs a grid of round-trip times × bandwidths ×
compression × window policy, each cell with a fresh gateway and connector whose tunnel crosses the emulated
hop, against a direct Flight server whose clients cross an identical hop, in the same namespace and run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .params import RunParams

PRIVATE_NS = "POC_WAN_NAMESPACE"  # set in the environment of a run inside its own network namespace
BUFFER_BYTES = 64 * 1024 * 1024  # per direction: what the relay holds before it stops reading


@dataclass(frozen=True)
class LinkSpec:
    """One emulated hop: round-trip time added (ms) and bandwidth each way (Mbit/s, 0 = not shaped)."""

    rtt_ms: float = 0.0
    mbps: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_ms <= 2000 or not 0 <= self.mbps <= 100_000:
            raise ValueError(f"a link needs 0 <= rtt_ms <= 2000 and 0 <= mbps <= 100000, got {self}")

    @classmethod
    def of(cls, value: "LinkSpec | dict | None") -> "LinkSpec":
        if isinstance(value, LinkSpec):
            return value
        return cls(**(value or {}))

    @property
    def plain(self) -> bool:
        return self.rtt_ms == 0 and self.mbps == 0

    def label(self) -> str:
        bandwidth = f"{self.mbps:g} Mbps" if self.mbps else "unshaped"
        return f"{self.rtt_ms:g} ms, {bandwidth}"


# ----------------------------------------------------------------------------- the relay

class _Side(asyncio.Protocol):
    """One socket of a relayed connection; what it reads leaves from its twin after `delay_s`."""

    def __init__(self, delay_s: float, limit: int, inbound: bool = False) -> None:
        self.inbound = inbound  # accepted: reads nothing until its twin is connected
        self.delay_s = delay_s
        self.limit = limit
        self.twin: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, chunk), oldest first
        self.held = 0
        self.reading_paused = False
        self.twin_paused = False  # the twin's socket buffer is full
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.early: list[bytes] = []  # read before the twin connected
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.inbound:
            transport.pause_reading()
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.twin is None or self.twin.transport is None:  # before its twin connected (uvloop reads early)
            self.early.append(data)
            return
        if self.delay_s <= 0 and not self.line:
            self.twin.transport.write(data)
        else:
            self.line.append((asyncio.get_running_loop().time() + self.delay_s, data))
            self.held += len(data)
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_at(self.line[0][0], self._release)
        self._throttle()

    def _release(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        while self.line and self.line[0][0] <= now and not self.twin_paused:
            _, chunk = self.line.popleft()
            self.held -= len(chunk)
            self.twin.transport.write(chunk)
        if self.line and not self.twin_paused:
            self.timer = asyncio.get_running_loop().call_at(self.line[0][0], self._release)
        elif not self.line and self.eof:
            self.twin.end()
        self._throttle()

    def end(self) -> None:
        """Pass an end of stream on: half-close this side's socket (or close it if it cannot)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.write_eof() if transport.can_write_eof() else transport.close()
        except OSError:
            transport.close()

    def _throttle(self) -> None:
        full = self.held > self.limit or self.twin_paused
        if full and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif not full and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    # the twin's writing side tells this side when to stop and start passing chunks on
    def pause_writing(self) -> None:
        self.twin.twin_paused = True
        self.twin._throttle()

    def resume_writing(self) -> None:
        self.twin.twin_paused = False
        if self.twin.line and self.twin.timer is None:
            self.twin._release()
        self.twin._throttle()

    def eof_received(self) -> bool:
        self.eof = True
        if self.twin is None or self.twin.transport is None:
            return True
        if not self.line:
            self.twin.end()
        return True

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.twin is not None and self.twin.transport is not None and not self.twin.transport.is_closing():
            self.twin.transport.close()


async def serve_relay(target: tuple[str, int], rtt_ms: float, host: str = "127.0.0.1", port: int = 0,
                      buffer_bytes: int = BUFFER_BYTES) -> asyncio.AbstractServer:
    """Accept on (host, port); each connection is relayed to `target`, each direction `rtt_ms / 2` late."""
    loop = asyncio.get_running_loop()
    one_way = rtt_ms / 2000

    async def join(inbound: _Side) -> None:
        await inbound.ready
        try:
            _, outbound = await loop.create_connection(lambda: _Side(one_way, buffer_bytes), *target)
        except OSError:
            inbound.transport.abort()
            return
        inbound.twin, outbound.twin = outbound, inbound
        early, inbound.early = inbound.early, []
        for chunk in early:
            inbound.data_received(chunk)
        if inbound.eof:
            inbound.eof_received()
        inbound.transport.resume_reading()

    def accept() -> _Side:
        side = _Side(one_way, buffer_bytes, inbound=True)
        task = loop.create_task(join(side))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return side

    tasks: set[asyncio.Task] = set()

    return await loop.create_server(accept, host, port)


def start_relay(target_port: int, rtt_ms: float, target_host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """A relay process in front of `target_port`; returns it and the port it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "poc.workbook.wan", "relay", "--target",
                             f"{target_host}:{target_port}", "--rtt-ms", str(rtt_ms)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the relay did not start (it printed {line!r})")
    return proc, int(line)


# ----------------------------------------------------------------------------- bandwidth (tc)

def in_private_namespace() -> bool:
    return os.environ.get(PRIVATE_NS) == "1"


def prepare_namespace() -> None:
    """Inside a namespace of our own: loopback up, an htb root whose unclassified traffic is not shaped."""
    if not in_private_namespace():
        raise RuntimeError("refusing to shape the loopback device outside a network namespace this run made")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb"], check=True)


_classes = iter(range(10, 10_000))


def shape_port(port: int, mbps: float) -> list[int]:
    """Pace traffic to and from `port` on loopback at `mbps` each way (one htb class per direction, its
    filter at a priority of its own); returns the class numbers, for `unshape`."""
    if not in_private_namespace():
        raise RuntimeError("refusing to shape the loopback device outside a network namespace this run made")
    rate = f"{mbps:g}mbit"
    burst = str(max(256 * 1024, int(mbps * 1e6 / 8 / 250)))  # a few ms of the rate, at least a 64 KiB GSO packet
    numbers = []
    for match in ("dport", "sport"):
        number = next(_classes)
        numbers.append(number)
        subprocess.run(["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{number}", "htb", "rate",
                        rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000"], check=True)
        subprocess.run(["tc", "filter", "add", "dev", "lo", "protocol", "ip", "parent", "1:", "prio", str(number),
                        "u32", "match", "ip", match, str(port), "0xffff", "flowid", f"1:{number}"], check=True)
    return numbers


def unshape(numbers: list[int]) -> None:
    """Remove what `shape_port` added: a port number used again later must not inherit an old rate."""
    for number in numbers:
        subprocess.run(["tc", "filter", "del", "dev", "lo", "parent", "1:", "prio", str(number)], check=False,
                       capture_output=True)
        subprocess.run(["tc", "class", "del", "dev", "lo", "classid", f"1:{number}"], check=False,
                       capture_output=True)


class WanHop:
    """One emulated hop in front of a server port: a relay when the hop has latency (or bandwidth, which is
    shaped at the relay's port), nothing at all when it is plain. `port` is where clients connect."""

    def __init__(self, target_port: int, spec: LinkSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.classes: list[int] = []
        self.port = target_port
        if spec.plain:
            return
        self.proc, self.port = start_relay(target_port, spec.rtt_ms)
        self.classes = shape_port(self.port, spec.mbps) if spec.mbps else []

    def close(self) -> None:
        unshape(self.classes)
        self.classes = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "WanHop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_in_namespace(argv: list[str], progress=None, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in a new network namespace (as root, or as an unprivileged user mapped to root in a new
    user namespace where the kernel allows it), with loopback shaping allowed inside. With `capture`, its
    output lines go to `progress` as they come and are returned in `stdout`."""
    env = {**os.environ, PRIVATE_NS: "1", **kwargs.pop("env", {})}
    prefix = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    if not capture:
        return subprocess.run(prefix + ["--"] + argv, env=env, **kwargs)
    kwargs.pop("check", None)
    lines = []
    with subprocess.Popen(prefix + ["--"] + argv, env=env, **kwargs) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if progress is not None:
                    progress(line.rstrip())
        finally:
            if proc.poll() is None:  # stopped early (an interrupt): stop the run and what it started
                proc.terminate()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), None)


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
        from ..config import ConfigError

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
    from .load.client import read_stream

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
    from ..config import make_tenants
    from .runner import Cluster

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
    from ..config import make_tenants
    from .dataset import dataset_folder
    from .runner import Cluster

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

    from .runner import machine_info

    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(asdict(params), indent=1))
    proc = run_in_namespace([sys.executable, "-m", "poc.workbook.wan", "run", "--params", str(out / "params.json"),
                             "--out", str(out / "wan.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False, capture=True, progress=progress)
    if proc.returncode != 0:
        raise RuntimeError(f"the WAN run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    doc = json.loads((out / "wan.json").read_text())
    result = WanResult(params, pl.DataFrame(doc["rows"]), doc["emulator"], machine_info())
    result.table().write_csv(out / "wan.csv")
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

    from .present import number

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


# ----------------------------------------------------------------------------- command line# ----------------------------------------------------------------------------- command line

def _relay_main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")

    async def main() -> None:
        server = await serve_relay((host or "127.0.0.1", int(port)), args.rtt_ms, port=args.port)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m poc.workbook.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="relay 127.0.0.1:PORT to a target, each direction half the RTT late")
    relay.add_argument("--target", required=True, help="HOST:PORT to relay to")
    relay.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add (default 0)")
    relay.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one, printed)")
    run = sub.add_parser("run", help="the WAN grid, inside a network namespace made for it (see run_wan)")
    run.add_argument("--params", required=True, help="JSON file of WanParams")
    run.add_argument("--out", required=True, help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    if args.command == "run":
        params = WanParams(**json.loads(Path(args.params).read_text()))
        doc = run_cells(params, log=lambda line: print(line, flush=True))
        Path(args.out).write_text(json.dumps(doc, indent=1))
        return
    try:
        _relay_main(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
