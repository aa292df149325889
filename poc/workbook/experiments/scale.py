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

from ...config import ConfigError, TenantCredentials, make_tenants, write_tenants
from ..servers.certs import make_test_pki
from ..dataset import dataset_folder
from ..params import RunParams
from ..report.present import number
from ..servers.runner import Cluster, machine_info, start_component

ACTIVE = "tenant_active"


@dataclass
class ScaleParams(RunParams):
    RUN_PREFIX = "scale"

    counts: tuple[int, ...] = (1000, 5000, 10000)  # idle tunnels per measurement, without TLS
    tls_counts: tuple[int, ...] = (1000, 10000)    # the same with TLS (wss://), measured after; () for none
    heartbeat_s: float = 60.0
    cpu_window_s: float = 30.0  # how long gateway CPU is sampled with the tunnels idle
    latency_calls: int = 200    # per latency figure (P50): half before, half after (warm-up: 10 calls each)
    rows: int = 20_000          # the active tenant's table

    def __post_init__(self) -> None:
        self.counts = tuple(int(c) for c in self.counts)
        self.tls_counts = tuple(int(c) for c in self.tls_counts)
        if (not self.counts or min(self.counts + self.tls_counts) < 1 or self.latency_calls < 2
                or self.cpu_window_s <= 0):
            raise ConfigError("need counts >= 1, latency_calls >= 2 and cpu_window_s > 0")
        super().__post_init__()


def _settled_rss(process: psutil.Process, quiet_s: float = 3.0, timeout_s: float = 15.0) -> int:
    """The process's RSS once it has not moved by more than 256 KiB for `quiet_s` (at most `timeout_s`): the
    gateway's frame allocator (jemalloc) hands the warm-up's freed frames back to the kernel a second or two
    later, megabytes that would otherwise show as idle tunnels costing less than nothing."""
    deadline = time.monotonic() + timeout_s
    rss, since = process.memory_info().rss, time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = process.memory_info().rss
        if abs(now - rss) > 256 * 1024:
            rss, since = now, time.monotonic()
    return process.memory_info().rss


def _latency_ms(cluster: Cluster, token: str, calls: int, warmup: int = 10) -> tuple[list[float], list[float]]:
    """GetFlightInfo and whole-DoGet times of the active tenant, in ms (after `warmup` unmeasured calls)."""
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=60)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    info_ms, get_ms = [], []
    tls = {"tls_root_certs": cluster.tls.ca.read_bytes()} if cluster.tls else {}
    with flight.connect(cluster.flight_uri, **tls) as client:
        for _ in range(warmup):
            client.do_get(client.get_flight_info(descriptor, options).endpoints[0].ticket, options).read_all()
        for _ in range(calls):
            start = time.perf_counter()
            ticket = client.get_flight_info(descriptor, options).endpoints[0].ticket
            info_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            client.do_get(ticket, options).read_all()
            get_ms.append((time.perf_counter() - start) * 1000)
    return info_ms, get_ms


def _p50s(*runs: tuple[list[float], list[float]]) -> tuple[float, float]:
    """P50 of GetFlightInfo and of DoGet over the calls of several runs."""
    return (statistics.median([x for run in runs for x in run[0]]),
            statistics.median([x for run in runs for x in run[1]]))


def _wait_tunnels(cluster: Cluster, done, timeout: float) -> float | None:
    """Seconds until `done(tenants_online)` holds, or None if it never did within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if done(cluster.health()["tenants_online"]):
                return time.monotonic() - start
        except OSError:
            pass  # the gateway is restarting
        time.sleep(0.2)
    return None


def measure(params: ScaleParams, count: int, work: Path, tls: bool = False, log=print) -> dict:
    """One gateway, one active tenant with a real connector, then `count` idle tunnels from a swarm."""
    idle = make_tenants(count, seed=count)
    active = TenantCredentials(ACTIVE, "active-connector-token", "active-client-token")
    tenants = {**idle, ACTIVE: active}
    data = dataset_folder(params.data_dir, params.rows)
    name = f"n{count}-tls" if tls else f"n{count}"
    pki = make_test_pki(work / name / "pki") if tls else None
    with Cluster(work / name, tenants, data, with_direct=False, with_connectors=False, tls=pki) as cluster:
        cluster.start_connector(ACTIVE)
        cluster.wait_online([ACTIVE])
        alone = [_latency_ms(cluster, active.client_token, params.latency_calls // 2)]
        gateway = psutil.Process(cluster.gateway.pid)
        rss_before = _settled_rss(gateway)
        start = time.monotonic()
        swarm_tenants = write_tenants(cluster.workdir / "swarm-tenants.yaml", idle)
        cluster.components["swarm"] = start_component(
            "swarm", ["swarm", "--gateway", cluster.ws_url, "--tenants", str(swarm_tenants),
                      "--heartbeat-s", str(params.heartbeat_s), *(("--ca-file", str(pki.ca)) if pki else ())],
            cluster.log_dir, ready_timeout=900)
        registered_s = time.monotonic() - start
        time.sleep(3)
        rss_after = gateway.memory_info().rss
        loaded = [_latency_ms(cluster, active.client_token, params.latency_calls // 2)]
        cpu_before = sum(gateway.cpu_times()[:2])
        time.sleep(params.cpu_window_s)
        cpu_pct = 100 * (sum(gateway.cpu_times()[:2]) - cpu_before) / params.cpu_window_s
        loaded.append(_latency_ms(cluster, active.client_token, params.latency_calls - params.latency_calls // 2))
        log(f"{count} tunnels{' with TLS' if tls else ''}: registered in {registered_s:.1f} s, "
            f"{(rss_after - rss_before) / count / 1024:.1f} KiB each, gateway CPU {cpu_pct:.2f} %")
        restart = time.monotonic()
        cluster.restart_gateway()
        again_s = _wait_tunnels(cluster, lambda online: online >= count + 1, 900)
        again_s = None if again_s is None else time.monotonic() - restart
        # the same tenant alone again, on the restarted gateway once the swarm's tunnels are gone: "alone" is
        # measured before and after the idle tunnels, so drift over the run does not pass for their cost
        cluster.components.pop("swarm").stop()
        if _wait_tunnels(cluster, lambda online: online <= 1, 300) is not None:
            alone.append(_latency_ms(cluster, active.client_token, params.latency_calls - params.latency_calls // 2))
        baseline, loaded = _p50s(*alone), _p50s(*loaded)
    return {"tunnels": count, "tls": tls, "heartbeat_s": params.heartbeat_s, "register_all_s": round(registered_s, 2),
            "gateway_rss_mb": round(rss_after / 2**20, 1),
            "kib_per_idle_tunnel": round((rss_after - rss_before) / count / 1024, 2),
            "gateway_cpu_pct_of_one_core": round(cpu_pct, 3),
            "register_again_after_restart_s": None if again_s is None else round(again_s, 2),
            "info_p50_ms_alone": round(baseline[0], 2), "info_p50_ms_with_idle": round(loaded[0], 2),
            "doget_p50_ms_alone": round(baseline[1], 2), "doget_p50_ms_with_idle": round(loaded[1], 2)}


def run_scale(params: ScaleParams, log=print) -> tuple[pl.DataFrame, dict]:
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(params, count, out / "clusters", tls, log)
            for tls, counts in ((False, params.counts), (True, params.tls_counts)) for count in counts]
    frame = pl.DataFrame(rows)
    machine = machine_info()
    frame.write_csv(out / "scale.csv")
    (out / "scale.json").write_text(json.dumps({"params": asdict(params), "machine": machine, "rows": rows},
                                               indent=1))
    (out / "machine.json").write_text(json.dumps(machine, indent=1))
    return frame, machine


def answer(frame: pl.DataFrame) -> str:
    """The report's first lines: the largest count measured, without TLS and with, against the issue's goals."""
    lines, met, total = [], 0, 0
    for tls in (False, True):
        rows = frame.filter(pl.col("tls") == tls).sort("tunnels")
        if rows.is_empty():
            continue
        r = rows.row(-1, named=True)
        info = r["info_p50_ms_with_idle"] / r["info_p50_ms_alone"] - 1
        get = r["doget_p50_ms_with_idle"] / r["doget_p50_ms_alone"] - 1
        again = r["register_again_after_restart_s"]
        goals = [(f"{number(r['kib_per_idle_tunnel'])} KiB of gateway memory per idle tunnel", None if tls else 20,
                  r["kib_per_idle_tunnel"], "≤ 20 KiB"),
                 (f"gateway CPU {number(r['gateway_cpu_pct_of_one_core'])} % of one core at "
                  f"{number(r['heartbeat_s'])} s heartbeats", 5, r["gateway_cpu_pct_of_one_core"], "< 5 %"),
                 ("all registered again " + ("never" if again is None else f"{number(again)} s") + " after a restart",
                  30, again, "≤ 30 s"),
                 (f"one active tenant's P50 with the idle tunnels: GetFlightInfo {info:+.0%}, DoGet {get:+.0%}",
                  0.10, max(info, get), "within 10 %")]
        verdicts = [f"{text} ({'goal ' + goal + ': ' + ('met' if value is not None and value <= limit else 'NOT met') if limit is not None else 'no goal with TLS'})"
                    for text, limit, value, goal in goals]
        met += sum(1 for _, limit, value, _ in goals if limit is not None and value is not None and value <= limit)
        total += sum(1 for _, limit, _, _ in goals if limit is not None)
        lines.append(f"- **{r['tunnels']:,} idle tunnels {'with TLS' if tls else 'without TLS'}:** " + "; ".join(verdicts) + ".")
    return "\n".join([f"**Answer: {met} of {total} goals met at the largest count measured.**", *lines])
