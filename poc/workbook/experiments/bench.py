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

from ...config import make_tenants
from ..dataset import dataset_folder
from ..load.client import read_stream
from ..servers.runner import Cluster, machine_info

TICKET_REFRESH_S = 60.0  # well inside the servers' ticket lifetime
# On shared cores a relay is CPU-bound: the tunnel's throughput follows the core-seconds each process spends
# per GB delivered. A connector that cost what the direct server costs (it serves the same bytes) and a gateway
# that cost what the direct server and its client cost together (it receives and sends them) would make the
# two-hop path cost about twice the direct one: about 0.5 × direct is its limit (`account` computes it from
# the run). The throughput goals are 90 % of that limit; the CPU goals say how close each hop must come.
GOALS = {  # figure: (goal, "min" = at least, "max" = at most)
    "ratio_c10": (0.45, "min"),
    "ratio_c100": (0.45, "min"),
    "single_latency_ratio": (2.0, "max"),
    "flightinfo_overhead_ms": (2.0, "max"),
    "gateway_peak_rss_mb": (300.0, "max"),
    "connector_cpu_ratio": (1.1, "max"),
    "gateway_cpu_ratio": (1.1, "max"),
}
LABELS = {
    "ratio_c10": "aggregate throughput tunnel ÷ direct, 10 concurrent",
    "ratio_c100": "aggregate throughput tunnel ÷ direct, 100 concurrent",
    "single_latency_ratio": "one DoGet alone, tunnel ÷ direct latency",
    "flightinfo_overhead_ms": "GetFlightInfo P50, tunnel − direct (ms)",
    "gateway_peak_rss_mb": "gateway peak RSS, 100 concurrent streams (MB)",
    "connector_cpu_ratio": "connector CPU per GB ÷ direct server's",
    "gateway_cpu_ratio": "gateway CPU per GB ÷ direct server's + client's",
}
# Whose CPU each path spends: the processes measured while it serves (the client is this process).
DIRECT_PROCESSES = ("server", "client")
TUNNEL_PROCESSES = ("connector", "gateway", "client")
# The reference: a plain Flight relay (`python -m poc relay`) in front of the direct server, batches relayed in
# C++ with no checks: what a two-hop path costs at the least with these libraries. Its keys start with this.
REFERENCE = "reference_"
REFERENCE_PROCESSES = ("server", "relay", "client")


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
    tunnels: tuple[str, ...] = ("websocket",)  # "websocket", "flight": measured in the same run
    reference: bool = True  # also measure a plain Flight relay in front of the direct server


@dataclass
class Path_:
    """One Flight endpoint under test and a way to call it."""

    name: str
    uri: str
    token: str
    ticket: flight.Ticket | None = None
    _ticket_at: float = 0.0
    client: flight.FlightClient | None = field(default=None, repr=False)

    def options(self) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {self.token}".encode())], timeout=600)

    def open(self) -> None:
        self.client = flight.connect(self.uri)
        self._refresh_ticket()

    def _refresh_ticket(self) -> None:
        info = self.client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), self.options())
        self.ticket, self._ticket_at = info.endpoints[0].ticket, time.monotonic()

    def do_get_bytes(self) -> int:
        if time.monotonic() - self._ticket_at > TICKET_REFRESH_S:  # tickets expire (--ticket-ttl-s)
            self._refresh_ticket()
        return read_stream(self.client.do_get(self.ticket, self.options()))[1]


def _aggregate(path: Path_, concurrency: int, requests: int) -> tuple[float, int]:
    """`requests` DoGets, `concurrency` at a time: (GB/s, bytes delivered)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(lambda _: path.do_get_bytes(), range(requests)))
    return total / 1e9 / (time.perf_counter() - start), total


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def account(run: dict, key: str = "") -> dict[str, float]:
    """Where a tunnel's core-seconds go, against the direct path of the same run (per GB delivered, medians
    over the concurrency levels): each hop's cost over its ideal (a connector at the direct server's cost, a
    gateway at the direct server's and client's together), the CPU ratio direct ÷ tunnel, and the two-hop limit
    of the throughput ratio: the direct path's cost over that ideal relay's, with the tunnel's own client."""
    server, client = run["direct_server_cpu_s_per_gb"], run["direct_client_cpu_s_per_gb"]
    connector, gateway = run[f"{key}connector_cpu_s_per_gb"], run[f"{key}gateway_cpu_s_per_gb"]
    tunnel_client = run[f"{key}client_cpu_s_per_gb"]
    direct_total = server + client
    ideal = server + (server + client) + tunnel_client
    figures = {f"{key}connector_cpu_ratio": connector / server,
               f"{key}gateway_cpu_ratio": gateway / direct_total,
               f"{key}tunnel_cpu_s_per_gb": connector + gateway + tunnel_client,
               f"{key}cpu_ratio": direct_total / (connector + gateway + tunnel_client),
               f"{key}two_hop_limit": direct_total / ideal}
    relay = run.get(f"{REFERENCE}relay_cpu_s_per_gb")
    if relay:  # the plain Flight relay measured beside: the gateway against what relaying costs with Flight
        figures[f"{key}gateway_relay_ratio"] = gateway / relay
        figures[f"{key}relay_limit"] = direct_total / (server + relay + tunnel_client)
    return figures


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
        self.start = self.peak = self.proc.memory_info().rss
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
    """Start a gateway, one connector per tunnel transport and a direct server; measure each figure
    `repetitions` times. The first tunnel's figures have the plain keys; the others' are prefixed
    with their name (`flight_ratio_c10`, ...)."""
    data = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(len(params.tunnels))
    by_tunnel = dict(zip(params.tunnels, tenants.values()))
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="poc-bench-") as work, \
            Cluster(work, tenants, data, delay_ms="0", gateway_args=params.gateway_args,
                    connector_args=params.connector_args, with_connectors=False) as cluster:
        for tunnel, creds in by_tunnel.items():
            cluster.start_connector(creds.tenant_id, url=cluster.tunnel_url(tunnel=tunnel))
        cluster.wait_online(list(tenants))
        first = params.tunnels[0]
        paths = {"direct": Path_("direct", cluster.direct_uri, by_tunnel[first].client_token)}
        paths.update({t: Path_(t, cluster.flight_uri, c.client_token) for t, c in by_tunnel.items()})
        if params.reference:
            relay = cluster.start_relay()
            paths["reference"] = Path_("reference", f"grpc://{cluster.host}:{relay.ready['flight_port']}",
                                       by_tunnel[first].client_token)
        for p in paths.values():
            p.open()
            p.do_get_bytes()  # warm-up
        gateway = psutil.Process(cluster.gateway.pid)
        idle_rss = gateway.memory_info().rss  # after the warm-up, before any load
        # the processes whose CPU each path spends, by role (DIRECT_PROCESSES, TUNNEL_PROCESSES)
        serving = {"direct": {"server": psutil.Process(cluster.components["direct"].pid)}}
        if params.reference:
            serving["reference"] = {"server": serving["direct"]["server"],
                                    "relay": psutil.Process(cluster.components["relay"].pid)}
        for name, creds in by_tunnel.items():
            connector = cluster.components[f"connector-{creds.tenant_id}"]
            serving[name] = {"connector": psutil.Process(connector.pid), "gateway": gateway}
        for processes in serving.values():
            processes["client"] = psutil.Process()  # this process: the load's threads
        for rep in range(params.repetitions):
            run: dict = {"repetition": rep}
            for level in params.concurrency:
                requests = params.requests_per_level or 2 * level
                gbs = {}
                for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
                    before = {role: _cpu_s(p) for role, p in serving[name].items()}
                    with _PeakRss(gateway.pid) as rss:
                        gbs[name], delivered = _aggregate(paths[name], level, requests)
                    key = _key(name, first)
                    for role, process in serving[name].items():
                        run[f"{key}{role}_cpu_s_per_gb_c{level}"] = (_cpu_s(process) - before[role]) / (delivered / 1e9)
                    if name in params.tunnels:
                        run[f"{key}gateway_peak_rss_mb_c{level}"] = rss.peak / 2**20
                        run[f"{key}gateway_held_mb_c{level}"] = (rss.start - idle_rss) / 2**20
                run[f"direct_gb_s_c{level}"] = gbs["direct"]
                if params.reference:
                    run[f"{REFERENCE}gb_s_c{level}"] = gbs["reference"]
                    run[f"{REFERENCE}ratio_c{level}"] = gbs["reference"] / gbs["direct"]
                for name in params.tunnels:  # ratios once direct is measured, whichever went first
                    key = _prefix(name, first)
                    run[f"{key}tunnel_gb_s_c{level}"] = gbs[name]
                    run[f"{key}ratio_c{level}"] = gbs[name] / gbs["direct"]
                log(f"rep {rep} c{level}: " + ", ".join(f"{n} {v:.2f} GB/s" for n, v in gbs.items()))
            single = {name: _single_s(p, params.single_runs) for name, p in paths.items()}
            info = {name: _info_p50_ms(p, params.info_calls) for name, p in paths.items()
                    if name != "reference"}  # the relay only passes GetFlightInfo on: no figure uses it
            run["direct_single_ms"], run["direct_flightinfo_p50_ms"] = single["direct"] * 1000, info["direct"]
            top = max(params.concurrency)
            measured = [("direct_", DIRECT_PROCESSES)] + ([(REFERENCE, REFERENCE_PROCESSES)] if params.reference else [])
            for key, roles in measured:
                for role in roles:
                    run[f"{key}{role}_cpu_s_per_gb"] = statistics.median(
                        run[f"{key}{role}_cpu_s_per_gb_c{c}"] for c in params.concurrency)
            if params.reference:
                run[f"{REFERENCE}single_ms"] = single["reference"] * 1000
            for name in params.tunnels:
                key = _prefix(name, first)
                run[f"{key}tunnel_single_ms"] = single[name] * 1000
                run[f"{key}single_latency_ratio"] = single[name] / single["direct"]
                run[f"{key}tunnel_flightinfo_p50_ms"] = info[name]
                run[f"{key}flightinfo_overhead_ms"] = info[name] - info["direct"]
                run[f"{key}gateway_peak_rss_mb"] = run[f"{key}gateway_peak_rss_mb_c{top}"]
                for role in TUNNEL_PROCESSES:
                    run[f"{key}{role}_cpu_s_per_gb"] = statistics.median(
                        run[f"{key}{role}_cpu_s_per_gb_c{c}"] for c in params.concurrency)
                run.update(account(run, key))
                run[f"{key}connector_rss_mb"] = serving[name]["connector"].memory_info().rss / 2**20
                run[f"{key}compressed_switches"] = cluster.compressed_switches(by_tunnel[name].tenant_id)  # so far
                log(f"rep {rep} {name}: single {run['direct_single_ms']:.0f} vs {single[name] * 1000:.0f} ms, "
                    f"flightinfo +{run[f'{key}flightinfo_overhead_ms']:.2f} ms, "
                    f"gateway peak {run[f'{key}gateway_peak_rss_mb']:.0f} MB")
            runs.append(run)
        for p in paths.values():
            p.client.close()
    result = summarize(runs, params)
    result["validation_s_per_gb"] = validation_cost(data)
    return result


def _prefix(tunnel: str, first: str) -> str:
    return "" if tunnel == first else f"{tunnel}_"


def _key(path: str, first: str) -> str:
    """The prefix of a path's figures: direct_, reference_, or the tunnel's (_prefix)."""
    return {"direct": "direct_", "reference": REFERENCE}.get(path) or _prefix(path, first)


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


def validation_cost(data: Path, rounds: int = 10) -> dict[str, float]:
    """Core-seconds per GB of IPC that the gateway's batch checks cost, measured in this process on the
    bench's own table: the bounds check it runs (string types read as binary) and full validation with UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ...catalog import cut_batches
    from ...gateway.arrow_checks import bounds_schema

    table = pq.read_table(next(data.glob("*.parquet")))
    messages = [b.serialize() for b in cut_batches(table)]
    size_gb = sum(m.size for m in messages) / 1e9
    bounds = bounds_schema(table.schema)

    def seconds(check) -> float:
        start = time.process_time()
        for _ in range(rounds):
            for m in messages:
                message = pa.ipc.read_message(m)
                check(message)
                pa.ipc.read_record_batch(message, table.schema)
        return (time.process_time() - start) / rounds

    none = seconds(lambda m: None)
    return {name: max(0.0, seconds(check) - none) / size_gb for name, check in (
        ("bounds", lambda m: pa.ipc.read_record_batch(m, bounds).validate(full=True)),
        ("full_with_utf8", lambda m: pa.ipc.read_record_batch(m, table.schema).validate(full=True)))}


def table(result: dict) -> str:
    tunnels = result["params"]["tunnels"]
    lines = []
    for tunnel in tunnels:
        lines += [f"{tunnel} tunnel", f"{'figure':<52}{'median':>10}{'spread':>20}{'goal':>10}  met", "-" * 98]
        lines += _goal_rows(result, _prefix(tunnel, tunnels[0]))
    return "\n".join(lines + _detail_rows(result))


def _goal_rows(result: dict, prefix: str) -> list[str]:
    lines = []
    for key, (goal, kind) in GOALS.items():
        f = result["figures"].get(prefix + key)
        if f is None:
            continue
        met = f["median"] >= goal if kind == "min" else f["median"] <= goal
        sign = "≥" if kind == "min" else "≤"
        spread = f"{f['min']:.2f}–{f['max']:.2f}"
        lines.append(f"{LABELS[key]:<52}{f['median']:>10.2f}{spread:>20}"
                     f"{sign + format(goal, 'g'):>10}  {'yes' if met else 'NO'}")
    return lines


HELD_WARNING_MB = 50


def _held_warnings(result: dict) -> list[str]:
    """The gateway serves every tunnel of the run: memory its allocator kept from one tunnel's streams counts in
    the peak of the next measured there. Warns where a tunnel's peak at the top level started that way."""
    tunnels, top = result["params"]["tunnels"], max(result["params"]["concurrency"])
    lines = []
    for t in tunnels:
        held = [r.get(f"{_prefix(t, tunnels[0])}gateway_held_mb_c{top}", 0.0) for r in result["runs"]]
        if max(held) > HELD_WARNING_MB:
            lines.append(f"  WARNING: the gateway began {t}'s {top} concurrent streams holding up to {max(held):.0f} MB "
                         "more than when idle (kept from another measurement at the same gateway): its peak RSS is an "
                         f"upper bound; for the memory goal run --tunnels {t} alone")
    return lines


def _detail_rows(result: dict) -> list[str]:
    fig, tunnels = result["figures"], result["params"]["tunnels"]
    lines = []
    for level in result["params"]["concurrency"]:
        parts = [f"direct {fig[f'direct_gb_s_c{level}']['median']:.2f} GB/s"]
        parts += [f"{t} {fig[f'{_prefix(t, tunnels[0])}tunnel_gb_s_c{level}']['median']:.2f} GB/s" for t in tunnels]
        if f"{REFERENCE}gb_s_c{level}" in fig:
            parts.append(f"plain Flight relay {fig[f'{REFERENCE}gb_s_c{level}']['median']:.2f} GB/s "
                         f"({fig[f'{REFERENCE}ratio_c{level}']['median']:.2f} × direct)")
        lines.append(f"  c{level}: " + ", ".join(parts))
    parts = [f"direct {fig['direct_single_ms']['median']:.0f} ms"]
    parts += [f"{t} {fig[f'{_prefix(t, tunnels[0])}tunnel_single_ms']['median']:.0f} ms" for t in tunnels]
    if f"{REFERENCE}single_ms" in fig:
        parts.append(f"plain Flight relay {fig[f'{REFERENCE}single_ms']['median']:.0f} ms")
    lines.append("  single DoGet: " + ", ".join(parts))
    parts = [f"direct {fig['direct_flightinfo_p50_ms']['median']:.2f} ms"]
    parts += [f"{t} {fig[f'{_prefix(t, tunnels[0])}tunnel_flightinfo_p50_ms']['median']:.2f} ms" for t in tunnels]
    lines.append("  GetFlightInfo P50: " + ", ".join(parts))
    lines.append("  connector RSS after the repetition's DoGets: " + ", ".join(
        f"{t} {fig[f'{_prefix(t, tunnels[0])}connector_rss_mb']['median']:.0f} MB" for t in tunnels
        if f"{_prefix(t, tunnels[0])}connector_rss_mb" in fig))
    lines += _cpu_rows(result)
    for t in tunnels:
        switches = max(r.get(f"{_prefix(t, tunnels[0])}compressed_switches", 0) for r in result["runs"])
        if switches:
            lines.append(f"  WARNING: the {t} connector turned compression on {switches} time(s) during the run "
                         "(--compression auto judged the loopback link wide-area): its gateway figures include "
                         "decompressing batches; run again, or pass --connector-arg=--compression=off")
    lines += _held_warnings(result)
    cost = result.get("validation_s_per_gb")
    if cost:
        lines.append(f"  batch validation in the gateway: {cost['bounds']:.3f} core-s/GB (bounds and offsets; "
                     f"{cost['full_with_utf8']:.3f} with UTF-8, not used)")
    lines.append(f"machine: {result['machine']['label']}; {len(result['runs'])} repetitions")
    return lines


def _cpu_rows(result: dict) -> list[str]:
    """Where every core-second goes: each process's CPU per GB delivered, per path, and the two-hop limit."""
    fig, tunnels = result["figures"], result["params"]["tunnels"]
    if "direct_server_cpu_s_per_gb" not in fig:
        return []
    m = {k: v["median"] for k, v in fig.items()}
    server, client = m["direct_server_cpu_s_per_gb"], m["direct_client_cpu_s_per_gb"]
    lines = ["  where the core-seconds go, per GB delivered (medians; the client is the bench's own process):",
             f"    {'direct':<11}server {server:.3f}, client {client:.3f}; total {server + client:.3f}"]
    relay = m.get(f"{REFERENCE}relay_cpu_s_per_gb")
    if relay:
        lines.append(f"    {'relay':<11}server {m[REFERENCE + 'server_cpu_s_per_gb']:.3f}, plain Flight relay {relay:.3f} "
                     f"({relay / (server + client):.2f} × server + client), client "
                     f"{m[REFERENCE + 'client_cpu_s_per_gb']:.3f}: what relaying costs with Flight and no checks")
    for t in tunnels:
        k = _prefix(t, tunnels[0])
        lines.append(f"    {t:<11}connector {m[k + 'connector_cpu_s_per_gb']:.3f} "
                     f"({m[k + 'connector_cpu_ratio']:.2f} × server), gateway {m[k + 'gateway_cpu_s_per_gb']:.3f} "
                     f"({m[k + 'gateway_cpu_ratio']:.2f} × server + client), "
                     f"client {m[k + 'client_cpu_s_per_gb']:.3f}; total {m[k + 'tunnel_cpu_s_per_gb']:.3f}")
        limit = m[k + "two_hop_limit"]
        reached = ", ".join(f"c{c} {m[f'{k}ratio_c{c}'] / limit:.0%}" for c in result["params"]["concurrency"])
        lines.append(f"    {t}: CPU ratio direct ÷ tunnel {m[k + 'cpu_ratio']:.2f}; two-hop limit of tunnel ÷ direct "
                     f"{limit:.2f} (a connector at the server's cost, a gateway at server + client); "
                     f"throughput reaches {reached} of it")
        if relay:
            lines.append(f"    {t}: gateway {m[k + 'gateway_relay_ratio']:.2f} × the plain Flight relay; with a "
                         f"gateway at the relay's cost tunnel ÷ direct could reach {m[k + 'relay_limit']:.2f}")
    return lines


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))
