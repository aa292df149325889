"""The scale experiment: one gateway holding thousands of idle tunnels (`python -m poc swarm`).

For each count: how long until every tunnel registered, gateway memory per idle tunnel, gateway CPU while
they only heartbeat, how long until all registered again after a gateway restart (the connectors' backoff
with jitter), and the GetFlightInfo and DoGet latency of one active tenant against the same with no idle
tunnel at all.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import psutil
import pyarrow.flight as flight

from ..config import ConfigError, TenantCredentials, make_tenants, write_tenants
from .dataset import dataset_folder
from .params import RunParams
from .runner import Cluster, machine_info, start_component

ACTIVE = "tenant_active"


@dataclass
class ScaleParams(RunParams):
    RUN_PREFIX = "scale"

    counts: tuple[int, ...] = (100, 500)  # idle tunnels per measurement
    heartbeat_s: float = 60.0
    cpu_window_s: float = 20.0  # how long gateway CPU is sampled with the tunnels idle
    latency_calls: int = 20
    rows: int = 20_000  # the active tenant's table

    def __post_init__(self) -> None:
        self.counts = tuple(int(c) for c in self.counts)
        if not self.counts or min(self.counts) < 1 or self.latency_calls < 1 or self.cpu_window_s <= 0:
            raise ConfigError("need counts >= 1, latency_calls >= 1 and cpu_window_s > 0")
        super().__post_init__()


def _latency_ms(cluster: Cluster, token: str, calls: int) -> tuple[float, float]:
    """P50 of GetFlightInfo and of a whole DoGet of the active tenant, in ms."""
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=60)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    info_ms, get_ms = [], []
    with flight.connect(cluster.flight_uri) as client:
        for _ in range(calls):
            start = time.perf_counter()
            ticket = client.get_flight_info(descriptor, options).endpoints[0].ticket
            info_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            client.do_get(ticket, options).read_all()
            get_ms.append((time.perf_counter() - start) * 1000)
    return statistics.median(info_ms), statistics.median(get_ms)


def _wait_online(cluster: Cluster, count: int, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if cluster.health()["tenants_online"] >= count:
                return time.monotonic() - start
        except OSError:
            pass  # the gateway is restarting
        time.sleep(0.2)
    return None


def measure(params: ScaleParams, count: int, work: Path, log=print) -> dict:
    """One gateway, one active tenant with a real connector, then `count` idle tunnels from a swarm."""
    idle = make_tenants(count, seed=count)
    active = TenantCredentials(ACTIVE, "active-connector-token", "active-client-token")
    tenants = {**idle, ACTIVE: active}
    data = dataset_folder(params.data_dir, params.rows)
    with Cluster(work / f"n{count}", tenants, data, with_direct=False, with_connectors=False) as cluster:
        cluster.start_connector(ACTIVE)
        cluster.wait_online([ACTIVE])
        baseline = _latency_ms(cluster, active.client_token, params.latency_calls)
        gateway = psutil.Process(cluster.gateway.pid)
        rss_before = gateway.memory_info().rss
        start = time.monotonic()
        swarm_tenants = write_tenants(cluster.workdir / "swarm-tenants.yaml", idle)
        cluster.components["swarm"] = start_component(
            "swarm", ["swarm", "--gateway", cluster.ws_url, "--tenants", str(swarm_tenants),
                      "--heartbeat-s", str(params.heartbeat_s)], cluster.log_dir, ready_timeout=900)
        registered_s = time.monotonic() - start
        time.sleep(3)
        rss_after = gateway.memory_info().rss
        cpu_before = sum(gateway.cpu_times()[:2])
        time.sleep(params.cpu_window_s)
        cpu_pct = 100 * (sum(gateway.cpu_times()[:2]) - cpu_before) / params.cpu_window_s
        loaded = _latency_ms(cluster, active.client_token, params.latency_calls)
        log(f"{count} tunnels: registered in {registered_s:.1f} s, "
            f"{(rss_after - rss_before) / count / 1024:.1f} KiB each, gateway CPU {cpu_pct:.2f} %")
        restart = time.monotonic()
        cluster.restart_gateway()
        again_s = _wait_online(cluster, count + 1, 900)
        again_s = None if again_s is None else time.monotonic() - restart
    return {"tunnels": count, "register_all_s": round(registered_s, 2),
            "gateway_rss_mb": round(rss_after / 2**20, 1),
            "kib_per_idle_tunnel": round((rss_after - rss_before) / count / 1024, 2),
            "gateway_cpu_pct_of_one_core": round(cpu_pct, 3),
            "register_again_after_restart_s": None if again_s is None else round(again_s, 2),
            "info_p50_ms_alone": round(baseline[0], 2), "info_p50_ms_with_idle": round(loaded[0], 2),
            "doget_p50_ms_alone": round(baseline[1], 2), "doget_p50_ms_with_idle": round(loaded[1], 2)}


def run_scale(params: ScaleParams, log=print) -> tuple[pl.DataFrame, dict]:
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(params, count, out / "clusters", log) for count in params.counts]
    frame = pl.DataFrame(rows)
    machine = machine_info()
    frame.write_csv(out / "scale.csv")
    (out / "scale.json").write_text(json.dumps({"params": asdict(params), "machine": machine, "rows": rows},
                                               indent=1))
    (out / "machine.json").write_text(json.dumps(machine, indent=1))
    return frame, machine
