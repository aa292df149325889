"""The resilience experiment: recovery and detection times over N trials, in-flight outcomes, isolation checks."""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow.flight as flight
import pyarrow.parquet as pq

from ...config import ConfigError, make_tenants
from ..dataset import dataset_folder
from ..params import RunParams
from ..report.present import number
from ..emulation.faults import TcpProxy
from ..load.client import LoadConfig, RequestRecord, run_load
from ..servers.runner import Cluster, machine_info

FAULTS = ("gateway_restart", "dropped_link", "half_open_link")


@dataclass
class ResilienceParams(RunParams):
    RUN_PREFIX = "resilience"

    rows: int = 200_000
    trials: int = 5
    tenant_count: int = 2
    inflight_requests: int = 6
    delay_ms: str = "300"
    heartbeat_s: float = 0.5
    offline_after_s: float = 2.0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.trials < 1 or self.tenant_count < 2 or self.offline_after_s <= self.heartbeat_s:
            raise ConfigError("need trials >= 1, tenant_count >= 2 and offline_after_s > heartbeat_s")
        super().__post_init__()


def _wait(predicate, timeout: float) -> float | None:
    """Seconds until `predicate()` held, or None if it never did within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def _inflight_load(cluster: Cluster, tokens: dict[str, str], requests: int) -> tuple[threading.Thread, list]:
    out: list[RequestRecord] = []
    cfg = LoadConfig(cluster.flight_uri, tokens, requests, requests, timeout_s=30, target="tunnel", progress=False)
    thread = threading.Thread(target=lambda: out.extend(run_load(cfg)), daemon=True)
    thread.start()
    return thread, out


def _sessions(cluster: Cluster) -> dict[str, str | None]:
    return {t: s.get("session_id") for t, s in cluster.health()["tenants"].items()}


def _all_online_again(cluster: Cluster, before: dict) -> bool:
    try:
        states = cluster.health()["tenants"]
    except OSError:
        return False
    return all(s["status"] == "online" and s["session_id"] != before.get(t) for t, s in states.items())


def run_trials(params: ResilienceParams) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Each fault `trials` times with a load in flight; then the isolation checks."""
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_folder(params.data_dir, params.rows, params.seed)
    tenants = make_tenants(params.tenant_count)
    tokens = {t.tenant_id: t.client_token for t in tenants.values()}
    rows = []
    gateway_args = ("--offline-after-s", str(params.offline_after_s), "--shutdown-grace-s", "0.5")
    # every tenant serves a table of its own (same size, other values), so isolation compares content
    data_of = {t: dataset_folder(params.data_dir, params.rows, params.seed + i) for i, t in enumerate(tenants)}
    with Cluster(out / "cluster", tenants, data, delay_ms=params.delay_ms, gateway_args=gateway_args,
                 with_connectors=False, with_direct=False) as cluster, \
            TcpProxy(cluster.tunnel_port) as proxy:
        for tenant_id in tenants:
            cluster.start_connector(tenant_id, url=cluster.tunnel_url(proxy.port), data=data_of[tenant_id],
                                    extra=("--heartbeat-s", str(params.heartbeat_s)))
        cluster.wait_online(list(tenants))
        for trial in range(params.trials):
            for fault in FAULTS:
                rows.append(_one_fault(cluster, proxy, fault, trial, tokens, params))
        isolation = isolation_checks(cluster, tenants, data_of)
    return pl.DataFrame(rows), pl.DataFrame(isolation), machine_info()


def _one_fault(cluster: Cluster, proxy: TcpProxy, fault: str, trial: int, tokens: dict, params) -> dict:
    before = _sessions(cluster)
    load, records = _inflight_load(cluster, tokens, params.inflight_requests)
    time.sleep(0.15)  # the requests are now waiting on the connectors' extraction delay
    start = time.monotonic()
    detection_s = None
    if fault == "gateway_restart":
        cluster.restart_gateway()
    elif fault == "dropped_link":
        proxy.drop()
    else:
        proxy.blackhole()
        detection_s = _wait(lambda: all(s["status"] == "offline" for s in cluster.health()["tenants"].values()),
                            params.offline_after_s * 5)
        proxy.heal()
    fault_ended = time.monotonic()
    online_s = _wait(lambda: _all_online_again(cluster, before), 60)
    load.join(60)
    served = run_load(LoadConfig(cluster.flight_uri, tokens, len(tokens), len(tokens), timeout_s=30,
                                 progress=False))
    statuses = [r.status for r in records]
    return {
        "fault": fault, "trial": trial,
        "detection_s": detection_s,
        "recovery_s": online_s,  # from the end of the fault (gateway up again, link dropped, link healed)
        "outage_s": (fault_ended - start + online_s) if online_s is not None else None,
        "served_after": all(r.status == "success" for r in served),
        "inflight": len(records), "inflight_success": statuses.count("success"),
        "inflight_error": statuses.count("error"), "inflight_timeout": statuses.count("timeout"),
        # A stream that ended as if complete but short: the load client flags it by comparing the rows it
        # read with GetFlightInfo's count; a success must also have every row of the dataset.
        "silently_short": sum(1 for r in records if (r.error or "").startswith("short stream")
                              or (r.status == "success" and r.rows_transferred != params.rows)),
        "total_elapsed_s": time.monotonic() - start,
    }


def isolation_checks(cluster: Cluster, tenants: dict, data_of: dict[str, Path]) -> list[dict]:
    """Pass/fail of the tenant-isolation rules against the live gateway; `data_of` names each tenant's
    data folder (their tables differ)."""
    a, b = list(tenants.values())[:2]
    opts = lambda token, tenant=None: flight.FlightCallOptions(  # noqa: E731
        headers=[(b"authorization", f"Bearer {token}".encode())] + ([(b"tenant-id", tenant.encode())] if tenant else []),
        timeout=10)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    checks = []

    def check(name: str, fn) -> None:
        try:
            passed, detail = fn()
        except Exception as exc:  # a check that crashes has failed
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append({"check": name, "passed": bool(passed), "detail": str(detail).splitlines()[0][:160]})

    def refused(call, error=flight.FlightError):
        try:
            call()
        except error as exc:
            return True, f"refused: {type(exc).__name__}"
        return False, "accepted"

    with flight.connect(cluster.flight_uri) as client:
        ticket_a = client.get_flight_info(descriptor, opts(a.client_token)).endpoints[0].ticket
        body, mac = ticket_a.ticket.split(b".")
        claims = json.loads(base64.urlsafe_b64decode(body))
        forged = base64.urlsafe_b64encode(json.dumps({**claims, "t": b.tenant_id}).encode()) + b"." + mac
        check("another tenant's ticket is refused",
              lambda: refused(lambda: client.do_get(ticket_a, opts(b.client_token)).read_all()))
        check("a forged ticket is refused",
              lambda: refused(lambda: client.do_get(flight.Ticket(forged), opts(b.client_token)).read_all()))
        check("a tenant-id header that disagrees with the token is refused",
              lambda: refused(lambda: client.get_flight_info(descriptor, opts(a.client_token, b.tenant_id))))
        check("a wrong client token is refused",
              lambda: refused(lambda: client.get_flight_info(descriptor, opts("not-a-real-token"))))
        def own_tables():
            got = {t.tenant_id: client.do_get(client.get_flight_info(descriptor, opts(t.client_token))
                                              .endpoints[0].ticket, opts(t.client_token)).read_all()
                   for t in (a, b)}
            own = {t: pq.read_table(data_of[t] / "sales.parquet") for t in got}
            ok = all(got[t].equals(own[t]) for t in got) and not got[a.tenant_id].equals(own[b.tenant_id])
            return ok, "each tenant's table equals its own connector's file and not the other's"

        check("each tenant reads exactly its own connector's table", own_tables)
    bad = cluster.start_connector(a.tenant_id, token="wrong-connector-token", name="isolation-bad-connector",
                                  wait=False)
    code = bad.popen.wait(30)
    checks.append({"check": "a connector with a wrong token is refused", "passed": code == 3,
                   "detail": f"exit code {code}"})
    return checks


def write_results(params: ResilienceParams, trials: pl.DataFrame, isolation: pl.DataFrame, machine: dict) -> None:
    out = params.out_dir
    trials.write_csv(out / "trials.csv")
    isolation.write_csv(out / "isolation.csv")
    (out / "resilience.json").write_text(json.dumps(
        {"params": asdict(params), "machine": machine, "trials": trials.to_dicts(),
         "isolation": isolation.to_dicts()}, indent=1, default=str))
    (out / "machine.json").write_text(json.dumps(machine, indent=1))


def summary(trials: pl.DataFrame) -> pl.DataFrame:
    return (trials.group_by("fault")
            .agg(pl.len().alias("trials"),
                 pl.col("detection_s").median().alias("detection_s_p50"),
                 pl.col("recovery_s").median().alias("recovery_s_p50"),
                 pl.col("recovery_s").max().alias("recovery_s_max"),
                 pl.col("outage_s").median().alias("outage_s_p50"),
                 pl.col("inflight_error").sum(), pl.col("inflight_timeout").sum(),
                 pl.col("inflight_success").sum(), pl.col("silently_short").sum(),
                 pl.col("served_after").all())
            .sort("fault"))


FAULT_NAMES = {"gateway_restart": "gateway restart", "dropped_link": "dropped link", "half_open_link": "half-open link"}


def answer(trials: pl.DataFrame, isolation: pl.DataFrame) -> str:
    """The report's first lines: did every fault recover, how fast, what happened to the requests in flight,
    and the isolation checks."""
    faults = summary(trials)
    recovered = trials["recovery_s"].null_count() == 0 and bool(trials["served_after"].all())
    short = int(trials["silently_short"].sum())
    passed = int(isolation["passed"].sum())
    ok = recovered and short == 0 and passed == isolation.height
    lines = [f"**Answer: {'every' if recovered else 'not every'} fault was recovered from, "
             f"{short} in-flight request{'' if short == 1 else 's'} ended as a silently short table, and "
             f"{passed} of {isolation.height} isolation checks passed — {'pass' if ok else 'FAIL'}.**"]
    for row in faults.iter_rows(named=True):
        inflight = row["inflight_success"] + row["inflight_error"] + row["inflight_timeout"]
        lines.append(f"- {FAULT_NAMES.get(row['fault'], row['fault'])} ({row['trials']} trials): all tenants served "
                     f"again {number(row['recovery_s_p50'])} s after the fault ended (median; max "
                     f"{number(row['recovery_s_max'])} s); of {inflight} requests in flight, "
                     f"{row['inflight_success']} finished, {row['inflight_error']} failed with an error, "
                     f"{row['inflight_timeout']} timed out.")
    return "\n".join(lines)
