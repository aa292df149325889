"""The corporate network (`run_corporate`, notebooks/corporate.ipynb): connectors in a network namespace whose only
way out is a real squid with Basic authentication, against connectors reaching the gateway directly, per transport:
registration time, throughput, and what happens to DoGets in flight when the proxy restarts or cuts tunnels that
stay silent longer than its idle timeout, with streams resumed (docs/protocol.md §6a) and without. The run makes a network namespace of its own (as the WAN experiment does) and,
inside it, a second one for the corporate side, joined to the first by a veth pair that holds nothing but the
proxy's address.

    python -m poc.workbook.experiments.corporate run --params PARAMS.json --out FIGURES.json   # inside the namespace
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..emulation.wan import experiment_main, prepare_namespace, run_experiment_in_namespace
from ..params import RunParams

# Streams' windows of 2 MiB (frames of 1 MiB): a DoGet that stopped reading holds at most that at the gateway, the
# rest still at the connector when the proxy restarts, whatever the table's size (loopback needs no more to be fast)
WINDOWS = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
PASSWORD = "corp-pw"  # the proxy user's (Basic authentication): the connector reads it from POC_PROXY_PASSWORD
TRANSPORTS = {"picows": ("websocket", ("--ws-impl", "picows")),
              "websockets": ("websocket", ("--ws-impl", "websockets")), "flight": ("flight", ())}


def _words(text: str | list) -> list[str]:
    return list(text) if isinstance(text, (list, tuple)) else [x.strip() for x in str(text).split(",") if x.strip()]


@dataclass
class CorporateParams(RunParams):
    """The corporate notebook's parameters (parameters/corporate.yaml names only what differs)."""

    RUN_PREFIX = "corporate"

    rows: int = 1_000_000                 # the table every DoGet reads (about 50 MB of Arrow IPC)
    transports: str = "picows,websockets,flight"
    reads: int = 3                        # whole-table DoGets per path for throughput (median)
    inflight: int = 4                     # DoGets read slowly across each proxy restart
    restarts: int = 2                     # proxy restarts per transport and resume setting
    resume_windows: str = "30,0"          # the gateway's --resume-window-s per setting; 0: streams fail at once
    idle_timeout_s: float = 3.0           # a second proxy cuts tunnels silent this long (squid's read_timeout)
    idle_heartbeats: str = "10,1"         # the connector's --heartbeat-s behind it: above the idle timeout, below
    idle_pause_s: float = 12.0            # DoGets in flight stop reading this long: their tunnel falls silent
    idle_transports: str = ""             # the transports measured behind the idle timeout; empty: every one

    def __post_init__(self) -> None:
        from ...config import ConfigError

        super().__post_init__()
        unknown = set(_words(self.transports)) - set(TRANSPORTS)
        if unknown or not _words(self.transports):
            raise ConfigError(f"transports must be among {', '.join(TRANSPORTS)}, got {self.transports!r}")
        if set(_words(self.idle_transports)) - set(_words(self.transports)):
            raise ConfigError(f"idle_transports must be among the transports ({self.transports}), "
                              f"got {self.idle_transports!r}")
        if self.rows < 1 or self.reads < 1 or self.inflight < 1 or self.restarts < 1:
            raise ConfigError("rows, reads, inflight and restarts must be at least 1")
        try:
            heartbeats = [float(x) for x in _words(self.idle_heartbeats)]
        except ValueError:
            heartbeats = []
        if not heartbeats or min(heartbeats) <= 0 or self.idle_timeout_s < 1 or self.idle_pause_s <= 0:
            raise ConfigError("idle_heartbeats must be positive seconds, idle_timeout_s at least 1 (squid counts "
                              "whole seconds) and idle_pause_s positive")


class CorporateNetwork:
    """A namespace for connectors whose only address outside it is the proxy's: a process holds it, a veth pair
    joins it to this one (HOST here, CORP there), and there is no other route. `launcher` runs a command in it."""

    HOST, CORP, DEVICE = "10.99.0.1", "10.99.0.2", "poc-corp"

    def __enter__(self) -> "CorporateNetwork":
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        pid = str(self.holder.pid)
        time.sleep(0.1)  # unshare has made the namespace once sleep runs; the veth's far end goes there
        for argv in (["ip", "link", "add", f"{self.DEVICE}0", "type", "veth", "peer", "name", f"{self.DEVICE}1"],
                     ["ip", "addr", "add", f"{self.HOST}/30", "dev", f"{self.DEVICE}0"],
                     ["ip", "link", "set", f"{self.DEVICE}0", "up"],
                     ["ip", "link", "set", f"{self.DEVICE}1", "netns", pid],
                     [*self.launcher, "ip", "addr", "add", f"{self.CORP}/30", "dev", f"{self.DEVICE}1"],
                     [*self.launcher, "ip", "link", "set", f"{self.DEVICE}1", "up"],
                     [*self.launcher, "ip", "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True)
        return self

    @property
    def launcher(self) -> tuple[str, ...]:
        return ("nsenter", "-t", str(self.holder.pid), "-n", "--")

    def reaches(self, port: int) -> bool:
        """Whether a process here can open a TCP connection to 127.0.0.1:port (the gateway's, outside)."""
        probe = f"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), 2)\nexcept OSError:\n exit(1)"
        return subprocess.run([*self.launcher, sys.executable, "-c", probe]).returncode == 0

    def __exit__(self, *exc) -> None:
        self.holder.kill()  # the namespace goes with it, and the veth pair with it
        self.holder.wait(5)


def _options(token: str):
    import pyarrow.flight as flight

    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=300)


def _read_all(uri: str, token: str) -> tuple[int, float]:
    """One whole-table DoGet: (IPC bytes delivered, seconds)."""
    import pyarrow.flight as flight

    options = _options(token)
    with flight.connect(uri) as client:
        started = time.perf_counter()
        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), options)
        reader = client.do_get(info.endpoints[0].ticket, options)
        size = 0
        for chunk in reader:
            size += chunk.data.nbytes
        return size, time.perf_counter() - started


class SlowReader(threading.Thread):
    """A DoGet that reads its first batch, waits for `go`, then reads the rest; `outcome` is exact, short or the
    error's first line."""

    def __init__(self, uri: str, token: str, expected, go: threading.Event) -> None:
        super().__init__(daemon=True)
        self.uri, self.token, self.expected, self.go = uri, token, expected, go
        self.started_reading = threading.Event()
        self.outcome = "not run"

    def run(self) -> None:
        import pyarrow as pa
        import pyarrow.flight as flight

        options = _options(self.token)
        try:
            with flight.connect(self.uri) as client:
                info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), options)
                reader = client.do_get(info.endpoints[0].ticket, options)
                batches = [reader.read_chunk().data]
                self.started_reading.set()
                self.go.wait(120)
                batches += [chunk.data for chunk in reader]
            table = pa.Table.from_batches(batches)
            self.outcome = "exact" if table.equals(self.expected) else "short"
        except Exception as exc:  # the outcome is what is measured
            self.outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            self.started_reading.set()


def _connector(cluster, transport: str, name: str, proxy=None, network: CorporateNetwork | None = None,
               heartbeat_s: float = 5.0):
    tunnel, impl = TRANSPORTS[transport]
    extra = (*impl, "--heartbeat-s", f"{heartbeat_s:g}", *(("--proxy", f"http://jo@{proxy.host}:{proxy.port}") if proxy else ()))
    from ..servers.runner import start_component

    args = ["connector", "--gateway", cluster.tunnel_url(tunnel=tunnel), "--tenant", "tenant_001", "--data",
            str(cluster.data), "--delay-ms", "0", *extra]
    started = time.monotonic()
    component = start_component(name, args, cluster.log_dir, wait=False,
                                env={"POC_CONNECTOR_TOKEN": cluster.tenants["tenant_001"].connector_token,
                                     "POC_PROXY_PASSWORD": PASSWORD, "http_proxy": "", "https_proxy": ""},
                                launcher=network.launcher if network else ())
    cluster.components[name] = component
    component.wait_ready(60)
    cluster.wait_online(["tenant_001"], timeout=60)
    return component, time.monotonic() - started


def _throughput(cluster, token: str, reads: int) -> float:
    rates = []
    for _ in range(reads):
        size, seconds = _read_all(cluster.flight_uri, token)
        rates.append(size * 8 / seconds / 1e6)
    return statistics.median(rates)


def _paused_readers(cluster, token: str, expected, inflight: int) -> tuple[threading.Event, list[SlowReader]]:
    """`inflight` DoGets that have read their first batch and stopped; they read on once the event is set."""
    go = threading.Event()
    readers = [SlowReader(cluster.flight_uri, token, expected, go) for _ in range(inflight)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.started_reading.wait(60)
    return go, readers


def _read_on(go: threading.Event, readers: list[SlowReader]) -> dict:
    """Let the readers read on; how many got the exact table, a short one, or an error (and which)."""
    go.set()
    for reader in readers:
        reader.join(180)
    outcomes = [r.outcome for r in readers]
    return {"inflight": len(readers), "exact": outcomes.count("exact"), "short": outcomes.count("short"),
            "failed": sum(o not in ("exact", "short") for o in outcomes),
            "errors": sorted({o for o in outcomes if o not in ("exact", "short")})}


def _restart_trial(cluster, squid, token: str, expected, inflight: int) -> dict:
    """`inflight` DoGets stop reading after their first batch; the proxy restarts; they read on. Recovery: from
    the proxy answering again to the tenant registered again."""
    first = cluster.health()["tenants"]["tenant_001"]["session_id"]
    go, readers = _paused_readers(cluster, token, expected, inflight)
    squid.stop()
    squid.start()
    back = time.monotonic()
    cluster.wait_online(["tenant_001"], timeout=90, session_not={"tenant_001": first})
    recovery_s = time.monotonic() - back
    return {"recovery_s": recovery_s, **_read_on(go, readers)}


def _idle_trial(cluster, token: str, expected, inflight: int, pause_s: float) -> dict:
    """`inflight` DoGets stop reading after their first batch for `pause_s`: their connector runs out of credit and
    its tunnel falls silent but for heartbeats. Cuts: each new session of the tenant seen meanwhile (the proxy cut
    the tunnel for silence and the connector dialled again), the last one counted once the readers are done, as a
    connector may dial again after the pause (it waits a random part of its back-off first)."""
    def session():
        return cluster.health()["tenants"].get("tenant_001", {}).get("session_id")

    sessions = [session()]
    go, readers = _paused_readers(cluster, token, expected, inflight)
    until = time.monotonic() + pause_s
    while time.monotonic() < until:
        now = session()
        if now is not None and now != sessions[-1]:
            sessions.append(now)
        time.sleep(0.2)
    if len(sessions) > 1:  # the readers go on once the tenant is online again, as after a restart
        cluster.wait_online(["tenant_001"], timeout=90)
    trial = _read_on(go, readers)
    now = cluster.wait_online(["tenant_001"], timeout=90)["tenants"]["tenant_001"]["session_id"]
    if now != sessions[-1]:
        sessions.append(now)
    return {"cuts": len(sessions) - 1, **trial, "errors": "; ".join(trial["errors"])[:300]}


def run_cells(params: CorporateParams, log=print) -> dict:
    """Every transport and resume setting, inside a network namespace of our own (see run_corporate)."""
    import pyarrow.parquet as pq

    from ...config import make_tenants
    from ..dataset import dataset_folder
    from ..servers.runner import Cluster
    from ..servers.squid import Squid

    prepare_namespace()
    data = dataset_folder(params.data_dir, params.rows)
    expected = pq.read_table(next(Path(data).glob("*.parquet")))
    tenants = make_tenants(1)
    token = tenants["tenant_001"].client_token
    rows, idle, checks = [], [], {}
    with tempfile.TemporaryDirectory(prefix="poc-corporate-") as work, CorporateNetwork() as network:
        for w, window in enumerate(_words(params.resume_windows)):
            with Cluster(Path(work) / f"resume-{window}", tenants, data, with_connectors=False, with_direct=False,
                         gateway_args=("--resume-window-s", window, *WINDOWS)) as cluster:
                ports = [cluster.gateway.ready["ws_port"], cluster.gateway.ready["flight_tunnel_port"]]
                checks.setdefault("direct_route_blocked", not network.reaches(ports[0]))
                with Squid(ports, users={"jo": PASSWORD}, host=network.HOST) as squid:
                    for transport in _words(params.transports):
                        row = {"transport": transport, "resume_window_s": float(window)}
                        if w == 0:  # registration and throughput do not depend on resuming: measured once
                            direct, row["direct_register_s"] = _connector(cluster, transport, f"direct-{transport}")
                            row["direct_mbps"] = _throughput(cluster, token, params.reads)
                            direct.stop()
                        proxied, row["proxy_register_s"] = _connector(cluster, transport, f"corp-{transport}-{w}",
                                                                      squid, network)
                        if w == 0:
                            row["proxy_mbps"] = _throughput(cluster, token, params.reads)
                        trials = [_restart_trial(cluster, squid, token, expected, params.inflight)
                                  for _ in range(params.restarts)]
                        proxied.stop()
                        row.update({"recovery_s": statistics.median(t["recovery_s"] for t in trials),
                                    "recovery_s_max": max(t["recovery_s"] for t in trials),
                                    "inflight": sum(t["inflight"] for t in trials),
                                    "exact": sum(t["exact"] for t in trials),
                                    "short": sum(t["short"] for t in trials),
                                    "failed": sum(t["failed"] for t in trials),
                                    "errors": "; ".join(sorted({e for t in trials for e in t["errors"]}))[:300]})
                        checks.setdefault("connects_in_access_log", {})[transport] = \
                            f"CONNECT 127.0.0.1:{ports[0 if TRANSPORTS[transport][0] == 'websocket' else 1]} jo" \
                            in squid.access_log()
                        rows.append(row)
                        log(f"{transport}, resume window {window} s: registered through the proxy in "
                            f"{row['proxy_register_s']:.2f} s; after {params.restarts} proxy restarts, "
                            f"{row['exact']} of {row['inflight']} DoGets in flight exact, {row['failed']} failed, "
                            f"back in {row['recovery_s']:.2f} s (median)")
                with Squid(ports, users={"jo": PASSWORD}, host=network.HOST,
                           idle_timeout_s=params.idle_timeout_s) as strict:
                    for transport in _words(params.idle_transports) or _words(params.transports):
                        for h, heartbeat in enumerate(float(x) for x in _words(params.idle_heartbeats)):
                            if w and heartbeat < params.idle_timeout_s:
                                continue  # nothing is cut: whether streams resume does not matter, measured once
                            proxied, _ = _connector(cluster, transport, f"idle-{transport}-{w}-{h}", strict, network,
                                                    heartbeat_s=heartbeat)
                            trial = _idle_trial(cluster, token, expected, params.inflight, params.idle_pause_s)
                            proxied.stop()
                            idle.append({"transport": transport, "resume_window_s": float(window),
                                         "heartbeat_s": heartbeat, **trial})
                            log(f"{transport}, resume window {window} s, heartbeat {heartbeat:g} s behind a "
                                f"{params.idle_timeout_s:g} s idle timeout: {trial['cuts']} cuts in "
                                f"{params.idle_pause_s:g} s, {trial['exact']} of {trial['inflight']} DoGets in "
                                f"flight exact, {trial['failed']} failed")
    return {"rows": rows, "idle": idle, "checks": checks}


def run_corporate(params: CorporateParams, progress=print) -> "CorporateResult":
    """Run every cell in a new network namespace and read its figures back; progress lines as they come."""
    import polars as pl

    from ..servers.runner import machine_info

    doc = run_experiment_in_namespace(__name__, params, "corporate", progress)
    result = CorporateResult(params, pl.DataFrame(doc["rows"]), doc["checks"], machine_info(),
                             pl.DataFrame(doc["idle"]))
    result.rows.write_csv(params.out_dir / "corporate.csv")
    result.idle.write_csv(params.out_dir / "corporate-idle.csv")
    return result


@dataclass
class CorporateResult:
    params: CorporateParams
    rows: "object"  # polars DataFrame: one row per transport and resume setting
    checks: dict
    machine: dict
    idle: "object"  # polars DataFrame: one row per transport, resume setting and heartbeat behind the idle timeout

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir


def _heartbeat_keeps(result: CorporateResult) -> bool:
    """Whether the run showed it: heartbeats inside the idle timeout cut nothing, further apart they did."""
    import polars as pl

    idle, limit = result.idle, result.params.idle_timeout_s
    if idle.is_empty():
        return False
    inside, outside = idle.filter(pl.col("heartbeat_s") < limit), idle.filter(pl.col("heartbeat_s") > limit)
    return (not inside.is_empty() and not outside.is_empty() and (inside["cuts"] == 0).all()
            and (outside["cuts"] > 0).all())


def answer(result: CorporateResult) -> str:
    """The report's first lines: which transport behind which proxy, then what each measure gave."""
    import polars as pl

    from ..report.present import number

    r = result.rows
    lines = ["**Answer: behind a proxy that tunnels TLS (CONNECT, with or without authentication), deploy the "
             "Flight tunnel (`flight+tls://`); behind one that inspects TLS, the WebSocket tunnel (`wss://`: the "
             "Flight tunnel's HTTP/2 does not pass an inspecting proxy, docs/operations.md). Either way, leave the "
             "gateway's `--resume-window-s` on: a proxy restart then costs DoGets in flight a pause, not an error.**"
             + (" **Keep the connector's heartbeat inside the proxy's idle timeout: a tunnel whose DoGets wait for "
                "their clients is then never cut.**" if _heartbeat_keeps(result) else "")]
    first = r.filter(pl.col("proxy_mbps").is_not_null()) if "proxy_mbps" in r.columns else r.head(0)
    for row in first.iter_rows(named=True):
        lines.append(f"- {row['transport']}: registered through the proxy in {number(row['proxy_register_s'])} s "
                     f"({number(row['direct_register_s'])} s without it); one DoGet at a time "
                     f"{number(row['proxy_mbps'])} Mbit/s through it, {number(row['direct_mbps'])} without "
                     f"({number(row['proxy_mbps'] / row['direct_mbps'])}×).")
    for row in r.sort("resume_window_s", "transport", descending=[True, False]).iter_rows(named=True):
        setting = "off" if not row["resume_window_s"] else f"{number(row['resume_window_s'])} s"
        lines.append(f"- {row['transport']}, resume {setting}: of {row['inflight']} DoGets in flight across "
                     f"{result.params.restarts} proxy restarts, {row['exact']} exact, {row['failed']} failed with an "
                     f"error, {row['short']} short; tunnel back {number(row['recovery_s'])} s after the proxy "
                     f"(max {number(row['recovery_s_max'])} s).")
    for row in result.idle.sort("resume_window_s", "transport", "heartbeat_s",
                                descending=[True, False, True]).iter_rows(named=True):
        setting = "off" if not row["resume_window_s"] else f"{number(row['resume_window_s'])} s"
        lines.append(f"- {row['transport']}, resume {setting}, heartbeat every {number(row['heartbeat_s'])} s behind a "
                     f"{number(result.params.idle_timeout_s)} s idle timeout: {row['cuts']} cuts while "
                     f"{row['inflight']} DoGets paused {number(result.params.idle_pause_s)} s; {row['exact']} exact, "
                     f"{row['failed']} failed, {row['short']} short.")
    lines.append(f"- The corporate namespace has no route to the gateway but the proxy: "
                 f"{'checked, a direct connection fails' if result.checks.get('direct_route_blocked') else 'NOT SO'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    experiment_main(argv, "poc.workbook.experiments.corporate", __doc__, CorporateParams, run_cells)


if __name__ == "__main__":
    main()
