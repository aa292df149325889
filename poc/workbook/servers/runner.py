"""Start and stop the components as real processes, wait for their health, sample CPU and memory.

Used by the notebooks, the benchmark and the integration tests. Every process
started here is stopped by its PID on exit, on error and on interrupt.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ...config import TenantCredentials, write_tenants


class ComponentError(RuntimeError):
    """A component did not start or is not healthy; the message carries the tail of its log."""


@dataclass
class Component:
    """One running `python -m poc ...` process."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    ready: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> dict:
        """Read the component's ready line from stdout; raise ComponentError if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if sel.select(min(left, 0.2)):
                    line = self.popen.stdout.readline()
                    if line:
                        self.ready = json.loads(line)
                        return self.ready
                if self.popen.poll() is not None:
                    raise ComponentError(f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail()}")
        raise ComponentError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; return the exit code."""
        self.terminate()
        return self.reap(timeout)

    def terminate(self) -> None:
        """SIGTERM, if it still runs: it drains and exits (`reap` waits for it)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> int | None:
        """Wait up to `timeout` for the process to exit, then SIGKILL it; return the exit code."""
        try:
            self.popen.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        if self.popen.stdout:
            self.popen.stdout.close()
        return self.popen.returncode


def stop_all(components: list[Component], timeout: float = 10.0) -> None:
    """SIGTERM every component at once, then reap each (SIGKILL what still runs after `timeout`): a group
    stops in the time of its slowest, not the sum of all."""
    for component in components:
        component.terminate()
    deadline = time.monotonic() + timeout
    for component in components:
        component.reap(deadline - time.monotonic())


def wait_all_ready(components: list[Component], timeout: float = 60.0) -> None:
    """Wait for the ready line of components started with `wait=False` (they start side by side); if one
    fails, stop them all and raise its ComponentError."""
    deadline = time.monotonic() + timeout
    try:
        for component in components:
            component.wait_ready(max(deadline - time.monotonic(), 0.1))
    except BaseException:
        stop_all(components)
        raise


def start_component(name: str, args: list[str], log_dir: Path, env: dict | None = None,
                    ready_timeout: float = 60.0, wait: bool = True, log_format: str = "text",
                    launcher: tuple[str, ...] = ()) -> Component:
    """Run `python -m poc ARGS` (behind `launcher`, a command that execs the rest in the same process) with
    its stderr in LOG_DIR/NAME.log; wait for its ready line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen([*launcher, sys.executable, "-m", "poc", "--log-format", log_format, *args],
                                 stdout=subprocess.PIPE, stderr=log,
                                 stdin=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    component = Component(name, popen, log_path)
    if wait:
        try:
            component.wait_ready(ready_timeout)
        except BaseException:
            component.stop()
            raise
    return component


def get_json(url: str, timeout: float = 5.0, token: str | None = None) -> dict:
    """GET a JSON document, with `authorization: Bearer <token>` when given."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the servers' certificate and key, and the CA that clients and connectors trust."""

    cert: Path
    key: Path
    ca: Path

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))


class Started:
    """`with X(...) as x:` for a group of processes in `workdir` sharing a tenants file: `start()` on entry
    (and `stop()` if it fails half-way), `stop()` on exit, also when the block fails."""

    workdir: Path
    tenants: dict[str, TenantCredentials]
    tenants_file: Path

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def prepare(self) -> None:
        """The work folder and the tenants file, before any process starts."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_tenants(self.tenants_file, self.tenants)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


TUNNEL_PORTS = {"websocket": "ws_port", "flight": "flight_tunnel_port"}  # tunnel → port
COMPRESSED_SWITCH = "batches go compressed"  # what a connector logs as --compression auto turns compression on


def compressed_switches(log_path: Path) -> int:
    """How many times a connector's `--compression auto` turned compression on, from its log. On loopback it
    should never: a switch means the link was judged wide-area (its heartbeats came back late under load), and
    the gateway then decompresses that tenant's batches (docs/results.md)."""
    try:
        with open(log_path, errors="replace") as log:
            return sum(COMPRESSED_SWITCH in line for line in log)
    except FileNotFoundError:
        return 0


class Cluster(Started):
    """A gateway, one connector per tenant and a direct server, on free loopback ports."""

    def __init__(self, workdir: str | Path, tenants: dict[str, TenantCredentials], data: str | Path,
                 delay_ms: str = "0", gateway_args: tuple[str, ...] = (), connector_args: tuple[str, ...] = (),
                 with_connectors: bool = True, with_direct: bool = True, host: str = "127.0.0.1",
                 tls: TlsFiles | None = None, tunnel: str | None = None, log_format: str = "text",
                 direct_args: tuple[str, ...] | None = None, direct_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.tenants = tenants
        self.data = Path(data)
        self.delay_ms = delay_ms
        self.gateway_args = list(gateway_args)
        self.connector_args = list(connector_args)
        self.with_connectors = with_connectors
        self.with_direct = with_direct
        self.host = host
        self.tls = tls
        self.tunnel = tunnel or os.environ.get("POC_TUNNEL", "websocket")  # or "flight"
        self.components: dict[str, Component] = {}
        self.tenants_file = self.workdir / "tenants.yaml"
        self.admin_token = secrets.token_hex(16)  # the gateway's /health view
        self.log_format = log_format
        self.direct_args = direct_args  # None: --data DATA; else these (e.g. --sources FILE)
        self.direct_env = direct_env or {}

    def start(self) -> None:
        self.prepare()
        self.start_gateway()
        # the connectors and the direct server start side by side once the gateway listens
        starting = [self.start_connector(tenant_id, wait=False) for tenant_id in self.tenants] \
            if self.with_connectors else []
        if self.with_direct:
            self.components["direct"] = start_component(
                "direct", ["direct", *(("--data", str(self.data)) if self.direct_args is None else self.direct_args),
                           "--host", self.host, "--port", "0", "--http-port", "0",
                           "--delay-ms", self.delay_ms, "--tenants", str(self.tenants_file), *self._tls_args()],
                self.log_dir, env=self.direct_env, wait=False)
            starting.append(self.components["direct"])
        wait_all_ready(starting)
        if self.with_connectors:
            self.wait_online(list(self.tenants))

    def start_gateway(self, extra: tuple[str, ...] = ()) -> Component:
        ports = ("--ws-port", "0", "--flight-port", "0", "--http-port", "0", "--flight-tunnel-port", "0")
        gateway = start_component(
            "gateway", ["gateway", "--tenants", str(self.tenants_file), "--host", self.host, *ports,
                        *self._tls_args(), *self.gateway_args, *extra], self.log_dir,
            env={"POC_ADMIN_TOKEN": self.admin_token}, log_format=self.log_format)
        self.components["gateway"] = gateway
        return gateway

    def start_connector(self, tenant_id: str, token: str | None = None, data: str | Path | None = None,
                        extra: tuple[str, ...] = (), name: str | None = None, wait: bool = True,
                        url: str | None = None, env: dict[str, str] | None = None) -> Component:
        """Start a connector for a tenant (its own token and the cluster's data unless told otherwise; `data`
        "" gives it no --data, for one that reads --sources only)."""
        token = token if token is not None else self.tenants[tenant_id].connector_token
        data_args = () if data == "" else ("--data", str(data or self.data))
        component = start_component(
            name or f"connector-{tenant_id}",
            ["connector", "--gateway", url or self.ws_url, "--tenant", tenant_id, *data_args,
             "--delay-ms", self.delay_ms, *(("--ca-file", str(self.tls.ca)) if self.tls else ()),
             *self.connector_args, *extra],
            self.log_dir, env={"POC_CONNECTOR_TOKEN": token, **(env or {})}, wait=wait, log_format=self.log_format)
        self.components[component.name] = component
        return component

    def start_relay(self) -> Component:
        """A plain Flight relay in front of the direct server (`python -m poc relay`, grpc:// only): the bench's
        reference for what a two-hop path costs with pyarrow's Flight."""
        relay = start_component("relay", ["relay", "--upstream", self.direct_uri, "--host", self.host, "--port", "0"],
                                self.log_dir)
        self.components["relay"] = relay
        return relay

    def restart_gateway(self, downtime_s: float = 0.0) -> Component:
        """Stop the gateway (SIGTERM) and start a new one on the same ports."""
        ports = self.gateway.ready
        self.gateway.stop()
        time.sleep(downtime_s)
        return self.start_gateway(("--ws-port", str(ports["ws_port"]), "--flight-port", str(ports["flight_port"]),
                                   "--http-port", str(ports["http_port"]),
                                   "--flight-tunnel-port", str(ports["flight_tunnel_port"])))

    def _tls_args(self) -> tuple[str, ...]:
        return self.tls.server_args() if self.tls else ()

    @property
    def gateway(self) -> Component:
        return self.components["gateway"]

    @property
    def tunnel_port(self) -> int:
        return self.gateway.ready[TUNNEL_PORTS[self.tunnel]]

    def tunnel_url(self, port: int | None = None, tunnel: str | None = None) -> str:
        """Where connectors dial: the cluster's tunnel (or `tunnel`: websocket or flight), at `port` if given."""
        tunnel = tunnel or self.tunnel
        port = port or self.gateway.ready[TUNNEL_PORTS[tunnel]]
        if tunnel == "flight":
            return f"{'flight+tls' if self.tls else 'flight'}://{self.host}:{port}"
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{port}/connect"

    @property
    def ws_url(self) -> str:
        return self.tunnel_url()

    @property
    def websocket_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.gateway.ready['ws_port']}/connect"

    @property
    def flight_scheme(self) -> str:
        return "grpc+tls" if self.tls else "grpc"

    @property
    def flight_uri(self) -> str:
        return f"{self.flight_scheme}://{self.host}:{self.gateway.ready['flight_port']}"

    @property
    def direct_uri(self) -> str:
        return f"{self.flight_scheme}://{self.host}:{self.components['direct'].ready['flight_port']}"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.gateway.ready['http_port']}/health"

    def health(self) -> dict:
        """The gateway's per-tenant view (with the cluster's admin token)."""
        return get_json(self.health_url, token=self.admin_token)

    def compressed_switches(self, tenant_id: str) -> int:
        """How many times that tenant's connector turned compression on so far (`compressed_switches`)."""
        return compressed_switches(self.log_dir / f"connector-{tenant_id}.log")

    def wait_online(self, tenant_ids: list[str], timeout: float = 30.0, session_not: dict | None = None) -> dict:
        """Wait until /health shows each tenant online (with a session other than `session_not[tenant]`)."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            health = self.health()
            states = health["tenants"]
            if all(states.get(t, {}).get("status") == "online"
                   and states[t]["session_id"] != (session_not or {}).get(t) for t in tenant_ids):
                return health
            time.sleep(0.05)
        raise ComponentError(f"tenants {tenant_ids} not online after {timeout:.0f} s: {health}")

    def stop(self) -> None:
        """Stop every component this cluster started: the connectors and the direct server together, then
        the gateway."""
        stop_all([c for name, c in self.components.items() if name != "gateway"])
        stop_all([c for name, c in self.components.items() if name == "gateway"])


def at_once(call, count: int, timeout: float = 300.0) -> None:
    """Run `call()` in `count` threads started together; return once all have ended (or `timeout` passed)."""
    threads = [threading.Thread(target=call, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def reset_peak_rss(pid: int) -> int:
    """Start a new peak: Linux resets a process's VmHWM to its current RSS when 5 is written to its clear_refs
    (its owner, or root, may). Returns the RSS now, in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")
    return peak_rss(pid)


def peak_rss(pid: int) -> int:
    """The process's peak RSS (VmHWM) since it started or since `reset_peak_rss`, in bytes: what it held at
    its worst, also if it gave the memory back before it was looked at."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class ProcessSampler:
    """Samples CPU % and RSS of named processes about every `interval_s` in a background thread."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.5) -> None:
        import psutil

        self._procs = {}
        for name, pid in pids.items():
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # prime: the first reading is always 0
                self._procs[name] = proc
            except psutil.Error:
                pass
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.phase = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def set_phase(self, phase: str) -> None:
        """Close the current phase with a sample and label the samples that follow."""
        self.sample()
        self.phase = phase

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        import psutil

        with self._lock:
            t = time.perf_counter() - self._t0
            for name, proc in self._procs.items():
                try:
                    with proc.oneshot():
                        cpu, rss = proc.cpu_percent(None), proc.memory_info().rss
                except psutil.Error:
                    continue
                self.samples.append({"t_s": round(t, 3), "process": name, "pid": proc.pid, "phase": self.phase,
                                     "cpu_percent": cpu, "rss_mb": rss / 2**20})


def machine_info() -> dict:
    """CPU model, cores, memory, OS and library versions: every report states the machine it ran on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = {}
    for name in ("pyarrow", "picows", "websockets", "grpcio", "prometheus_client", "polars", "altair", "papermill",
                 "psutil"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    cores = os.cpu_count() or 1
    memory_gb = psutil.virtual_memory().total / 2**30
    return {
        "cpu_model": model, "cores": cores, "memory_gb": round(memory_gb, 1),
        "os": platform.platform(), "python": platform.python_version(), "libraries": libs,
        "label": f"{cores} cores · {memory_gb:.0f} GiB · {model}",
    }
