"""The scale-out experiment: gateway replicas on a real Redis under load, through a SIGKILL, an added replica
and a rolling restart; and what a forwarded DoGet and a redirect cost against one served by the owner.

Connectors keep `tunnels` tunnels each and know every replica's address, the one added later included (as a
DNS name would give it). Readers pick a ready replica for every call, as a load balancer would; half of them
follow endpoint locations (they read from the owner), half do not (the replica they called forwards).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow.flight as flight

from ...config import ConfigError, make_tenants
from ..dataset import dataset_folder
from ..params import RunParams
from ..report.present import number
from ..servers.replicas import LoadLoop, Replicas
from ..servers.runner import machine_info


@dataclass
class ScaleoutParams(RunParams):
    RUN_PREFIX = "scaleout"

    replicas: int = 3
    tenants: int = 10
    tunnels: int = 2            # per connector, each to a different replica
    rows: int = 100_000         # each tenant's table
    readers: int = 6            # concurrent readers; half follow endpoint locations
    phase_s: float = 20.0       # load before the SIGKILL, after it, after the added replica, after the restarts
    registry_ttl_s: float = 5.0
    rebalance_s: float = 2.0
    cost_calls: int = 30        # calls per figure of the forwarding cost
    sample_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.replicas < 2 or self.tenants < 1 or self.tunnels < 1 or self.readers < 2 or self.phase_s <= 0:
            raise ConfigError("need replicas >= 2, tenants >= 1, tunnels >= 1, readers >= 2 and phase_s > 0")
        super().__post_init__()


@dataclass
class ScaleoutResult:
    params: ScaleoutParams
    requests: pl.DataFrame   # one row per call: start/end (s from the run's start), through, read_from, error
    tunnels: pl.DataFrame    # samples: t, gateway, tunnels (from the registry)
    events: pl.DataFrame     # t, event
    cost: pl.DataFrame       # how, p50_ms, calls
    machine: dict

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir


def _timed(calls: int, once) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        once()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _owner_and_other(replicas: Replicas, tenant: str, timeout_s: float = 15.0) -> tuple[str, str]:
    """A replica holding the tenant's tunnel and one without. Right after the connectors come up the replicas
    are still evening out their tunnels (--rebalance-s): a moved tunnel is registered at its new replica before
    its old entry goes, so for a moment the tenant may show at every replica. Waits for that to settle."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = replicas.health(next(iter(replicas.gateways)))["tenants"][tenant]
        owners = {t["gateway"] for t in state.get("tunnels", [])}
        others = [g for g in replicas.gateways if g not in owners]
        if owners and others:
            return sorted(owners)[0], others[0]
        if time.monotonic() > deadline:
            raise ConfigError(f"the forwarding cost needs a replica with the tenant's tunnel and one without; after "
                              f"{timeout_s:.0f} s its tunnels are at {sorted(owners) or 'none'}")
        time.sleep(0.2)


def forwarding_cost(replicas: Replicas, tenant: str, calls: int) -> pl.DataFrame:
    """GetFlightInfo + DoGet of one tenant's table, P50 over `calls`: at a replica holding its tunnel (the
    owner), at one that does not and forwards the DoGet, and following the endpoint's location from there
    (a redirect: a second connection, to the owner)."""
    owner, other = _owner_and_other(replicas, tenant)
    token = replicas.tenants[tenant].client_token
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=60)
    descriptor = flight.FlightDescriptor.for_path("dataset", "sales")
    rows = {}

    def direct_at(gateway: str):
        def once():
            with flight.connect(replicas.flight_uri(gateway)) as client:
                info = client.get_flight_info(descriptor, options)
                rows[gateway] = client.do_get(info.endpoints[0].ticket, options).read_all().num_rows
        return once

    def redirected():
        with flight.connect(replicas.flight_uri(other)) as client:
            endpoint = client.get_flight_info(descriptor, options).endpoints[0]
        with flight.connect(endpoint.locations[0]) as client:
            rows["redirect"] = client.do_get(endpoint.ticket, options).read_all().num_rows

    figures = []
    for how, once in (("owner", direct_at(owner)), ("forwarded", direct_at(other)), ("redirect", redirected)):
        once()  # warm-up
        figures.append({"how": how, "p50_ms": statistics.median(_timed(calls, once)), "calls": calls})
    if len(set(rows.values())) != 1:
        raise RuntimeError(f"the three ways read different row counts: {rows}")
    frame = pl.DataFrame(figures)
    owner_ms = figures[0]["p50_ms"]
    return frame.with_columns((pl.col("p50_ms") / owner_ms).alias("vs_owner"))


class _TunnelSampler:
    """Tunnels per replica, as each replica's registry record says, every `interval_s`."""

    def __init__(self, replicas: Replicas, t0: float, interval_s: float) -> None:
        import redis

        self._redis = redis.Redis.from_url(replicas.redis.url, socket_timeout=1)
        self._t0 = t0
        self._interval = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self._redis.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            t = time.time() - self._t0
            try:
                for key in self._redis.scan_iter("poc:gateway:*"):
                    record = json.loads(self._redis.get(key) or "null")
                    if record:
                        self.samples.append({"t": t, "gateway": record["id"], "tunnels": record["tunnels"]})
            except Exception:  # Redis is not what this experiment breaks; a missed sample is only a gap
                pass


def run_scaleout(params: ScaleoutParams, log=print) -> ScaleoutResult:
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(params.tenants)
    ids = [f"gw-{i}" for i in range(1, params.replicas + 2)]
    added = ids[-1]
    events: list[dict] = []
    with Replicas(out / "cluster", tenants, data, count=params.replicas, registry_ttl_s=params.registry_ttl_s,
                  gateway_args=("--rebalance-s", str(params.rebalance_s))) as replicas:
        replicas.reserve(added)
        for tenant in tenants:
            replicas.connect(tenant, *ids, tunnels=params.tunnels)
        replicas.wait_routable(list(tenants), timeout=60)
        log("replicas and connectors up; measuring the forwarding cost")
        cost = forwarding_cost(replicas, next(iter(tenants)), params.cost_calls)
        t0 = time.time()

        def event(what: str) -> None:
            events.append({"t": time.time() - t0, "event": what})
            log(f"{events[-1]['t']:6.1f} s  {what}")

        live = ids[:-1]
        with _TunnelSampler(replicas, t0, params.sample_interval_s) as sampler, \
                LoadLoop(replicas, list(tenants), readers=params.readers, following=params.readers // 2,
                         max_seconds=params.phase_s * 8 + 300) as load:
            event("load starts")
            time.sleep(params.phase_s)
            victim = live[1]
            event(f"SIGKILL {victim}")
            replicas.kill(victim)
            live.remove(victim)
            time.sleep(params.phase_s)
            replicas.start_gateway(added)
            live.append(added)
            event(f"{added} added")
            time.sleep(params.phase_s)
            for gateway in list(live):
                event(f"SIGTERM {gateway} (rolling restart)")
                replicas.restart(gateway)
                event(f"{gateway} back")
                time.sleep(params.phase_s / len(live))
            time.sleep(params.phase_s / 2)
            event("load stops")
    requests = pl.DataFrame(load.records, infer_schema_length=None).with_columns((pl.col("start") - t0).alias("start"),
                                                        (pl.col("end") - t0).alias("end"))
    result = ScaleoutResult(params, requests, pl.DataFrame(sampler.samples), pl.DataFrame(events), cost,
                            machine_info())
    _write(result)
    return result


def _write(result: ScaleoutResult) -> None:
    out = result.out_dir
    result.requests.write_csv(out / "requests.csv")
    result.tunnels.write_csv(out / "tunnels.csv")
    result.events.write_csv(out / "events.csv")
    result.cost.write_csv(out / "forwarding_cost.csv")
    (out / "scaleout.json").write_text(json.dumps(
        {"params": asdict(result.params), "machine": result.machine, "events": result.events.to_dicts(),
         "cost": result.cost.to_dicts()}, indent=1, default=str))
    (out / "machine.json").write_text(json.dumps(result.machine, indent=1))


def cause(error: str | None) -> str:
    """A failed call's cause, in a few words."""
    if error is None:
        return "ok"
    for needle, name in (("disconnected", "tunnel lost mid-stream"), ("shutting down", "replica shutting down"),
                         ("Connection reset", "replica gone mid-call"), ("Stream removed", "replica gone mid-call"),
                         ("offline", "tenant offline"), ("registry", "registry unreachable"),
                         ("stale owner", "stale owner"), ("failed to connect", "replica unreachable"),
                         ("Connection refused", "replica unreachable"), ("Deadline", "timeout")):
        if needle in error:
            return name
    return error.split(":")[0]


def failover(result: ScaleoutResult) -> dict:
    """What the SIGKILL did: calls it failed (all started before it and ended after), calls that failed
    later than 2 s after it, and the first success that read from a surviving replica after it."""
    kill = result.events.filter(pl.col("event").str.starts_with("SIGKILL"))
    if kill.is_empty():
        return {}
    t = kill["t"][0]
    r = result.requests.with_columns(pl.col("error").map_elements(cause, return_dtype=pl.Utf8).alias("cause"))
    failed = r.filter(pl.col("error").is_not_null())
    return {"killed_at_s": t,
            "failed_in_flight": failed.filter((pl.col("start") < t) & (pl.col("end") >= t)).height,
            "failed_after_2s": failed.filter(pl.col("start") > t + 2).height,
            "failed_between": failed.filter((pl.col("start") >= t) & (pl.col("start") <= t + 2)).height,
            "short_tables": r.filter(pl.col("error").is_null() & (pl.col("rows") != pl.col("expected"))).height}


def answer(result: ScaleoutResult) -> str:
    """The report's first lines: failures per phase against the goals, the added replica's share, the cost."""
    r = result.requests
    ev = result.events
    f = failover(result)
    restarts = ev.filter(pl.col("event").str.contains("rolling restart"))
    rolling_from = restarts["t"].min() if restarts.height else None
    rolling_failed = (r.filter(pl.col("error").is_not_null() & (pl.col("start") >= rolling_from)).height
                      if rolling_from is not None else None)
    added = ev.filter(pl.col("event").str.ends_with("added"))
    share_line = ""
    if added.height and result.tunnels.height:
        name = added["event"][0].split()[0]
        t_add = added["t"][0]
        total = result.params.tenants * result.params.tunnels
        share = total // result.params.replicas  # live replicas after the kill and the addition
        reached = result.tunnels.filter((pl.col("gateway") == name) & (pl.col("tunnels") >= max(1, share - 1))
                                        & (pl.col("t") >= t_add))
        share_line = (f"- **Scale-out:** {name} held {max(1, share - 1)}+ of {total} tunnels "
                      + (f"{number(reached['t'].min() - t_add)} s after it started (goal: within 60 s)."
                         if reached.height else "never within the run (goal: within 60 s)."))
    cost = {row["how"]: row for row in result.cost.iter_rows(named=True)}
    ok = f.get("failed_after_2s", 1) == 0 and f.get("short_tables", 1) == 0 and rolling_failed == 0
    return "\n".join([
        f"**Answer: {'pass' if ok else 'FAIL'} — {r.height:,} calls, {r['error'].is_not_null().sum():,} failed, "
        f"{f.get('short_tables', 0)} silently short.**",
        f"- **SIGKILL of a replica:** {f.get('failed_in_flight', 0)} calls in flight through it failed with an error; "
        f"{f.get('failed_between', 0)} started within 2 s after it failed; {f.get('failed_after_2s', 0)} later "
        "(goal: 0 after 2 s with a second tunnel).",
        share_line,
        f"- **Rolling restart of every live replica:** {rolling_failed} failed calls (goal: 0).",
        f"- **Cost of not reading from the owner** (GetFlightInfo + DoGet of {result.params.rows:,} rows, P50): "
        f"owner {number(cost['owner']['p50_ms'])} ms, forwarded {number(cost['forwarded']['p50_ms'])} ms "
        f"({cost['forwarded']['vs_owner']:.2f}×), redirect {number(cost['redirect']['p50_ms'])} ms "
        f"({cost['redirect']['vs_owner']:.2f}×)."])
