"""`python -m poc soak`: clients that abandon their streams, for minutes, on each tunnel transport.

Some clients read the whole table again and again; others leave after the first batch, as a user who
cancels does. Every cancel crosses frames already on the wire, so this is where a race between a cancel
and arriving data shows. The run reports, per transport: full reads (each checked row by row count),
abandoned reads, errors, whether any connector had to reconnect, streams left in flight at the end, and
the gateway's and connectors' memory over time (flat, or growing).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow.flight as flight

from ...config import make_tenants
from ..dataset import dataset_folder
from ..servers.runner import Cluster, machine_info

TRANSPORTS = ("picows", "websockets", "flight")


@dataclass
class SoakParams:
    seconds: float = 300.0
    clients: int = 8
    abandoning: int = 2  # of `clients`, those that leave after the first batch
    tenants: int = 2
    rows: int = 1_000_000
    transports: tuple[str, ...] = TRANSPORTS
    sample_s: float = 5.0
    data_dir: str = "outputs/data"
    gateway_args: tuple[str, ...] = ()


@dataclass
class SoakResult:
    transport: str
    seconds: float
    full_reads: int = 0
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0
    streams_left: int = -1
    reserved_left: int = -1
    exited: list[str] = field(default_factory=list)  # processes that ended during the run (none should)
    rss_mb: dict[str, list[float]] = field(default_factory=dict)  # process → samples

    def growth_mb(self, process: str) -> float:
        """Last sample minus the median of the first quarter (after warm-up): memory that kept growing."""
        samples = self.rss_mb.get(process, [])
        if len(samples) < 4:
            return 0.0
        head = sorted(samples[: max(1, len(samples) // 4)])
        return samples[-1] - head[len(head) // 2]


def _reader(cluster: Cluster, token: str, rows: int, abandon: bool, stop: threading.Event, result: SoakResult,
            lock: threading.Lock) -> None:
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=60)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    with flight.connect(cluster.flight_uri) as client:
        while not stop.is_set():
            try:
                ticket = client.get_flight_info(descriptor, options).endpoints[0].ticket
                reader = client.do_get(ticket, options)
                if abandon:
                    reader.read_chunk()
                    reader.cancel()
                    with lock:
                        result.abandoned += 1
                    continue
                got = reader.read_all().num_rows
                with lock:
                    if got == rows:
                        result.full_reads += 1
                    else:
                        result.errors.append(f"short table: {got} of {rows} rows")
            except Exception as exc:  # every error is reported: the goal is none
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def soak_one(params: SoakParams, transport: str, work: Path, log=print) -> SoakResult:
    """One transport: a gateway, one connector per tenant, `clients` readers for `seconds`."""
    data = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(params.tenants)
    ws_args = () if transport == "flight" else ("--ws-impl", transport)
    result = SoakResult(transport, params.seconds)
    with Cluster(work / transport, tenants, data, gateway_args=(*ws_args, *params.gateway_args),
                 connector_args=ws_args, with_direct=False,
                 tunnel="flight" if transport == "flight" else "websocket") as cluster:
        sessions = {t: s["session_id"] for t, s in cluster.health()["tenants"].items()}
        procs = {name: psutil.Process(c.pid) for name, c in cluster.components.items()}
        stop, lock = threading.Event(), threading.Lock()
        tokens = [t.client_token for t in tenants.values()]
        threads = [threading.Thread(target=_reader, daemon=True, args=(
            cluster, tokens[i % len(tokens)], params.rows, i < params.abandoning, stop, result, lock))
            for i in range(params.clients)]
        for thread in threads:
            thread.start()
        end = time.monotonic() + params.seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, params.sample_s))
            for name, proc in procs.items():
                result.rss_mb.setdefault(name, []).append(round(proc.memory_info().rss / 2**20, 1))
            log(f"{transport}: {result.full_reads} full, {result.abandoned} abandoned, {len(result.errors)} errors, "
                f"gateway {result.rss_mb['gateway'][-1]:.0f} MB")
        stop.set()
        for thread in threads:
            thread.join(90)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = cluster.health()
            result.streams_left, result.reserved_left = health["streams_in_flight"], health["buffer_reserved_bytes"]
            if result.streams_left == 0:
                break
            time.sleep(0.1)
        result.reconnects = sum(1 for t, s in health["tenants"].items() if s.get("session_id") != sessions[t])
        result.exited = [name for name, c in cluster.components.items() if c.popen.poll() is not None]
    return result


def run_soak(params: SoakParams, log=print) -> list[SoakResult]:
    with tempfile.TemporaryDirectory(prefix="poc-soak-") as work:
        return [soak_one(params, transport, Path(work), log) for transport in params.transports]


def passed(result: SoakResult) -> bool:
    """Every tenant served throughout: no error, no reconnect, no process gone, no stream left behind."""
    return not result.errors and not result.reconnects and not result.exited and result.streams_left == 0


def table(results: list[SoakResult]) -> str:
    lines = ["transport   seconds  full reads  abandoned  errors  reconnects  streams left  "
             "gateway MB (growth)  connectors MB (growth)"]
    for r in results:
        connectors = [p for p in r.rss_mb if p.startswith("connector")]
        lines.append(
            f"{r.transport:<11} {r.seconds:>7.0f}  {r.full_reads:>10}  {r.abandoned:>9}  {len(r.errors):>6}  "
            f"{r.reconnects:>10}  {r.streams_left:>12}  "
            f"{r.rss_mb['gateway'][-1]:>7.0f} ({r.growth_mb('gateway'):+.0f})      "
            + ", ".join(f"{r.rss_mb[c][-1]:.0f} ({r.growth_mb(c):+.0f})" for c in connectors))
    return "\n".join(lines)


def write_json(params: SoakParams, results: list[SoakResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"params": asdict(params), "machine": machine_info(),
                                      "results": [asdict(r) | {"gateway_growth_mb": r.growth_mb("gateway")}
                                                  for r in results]}, indent=1))
