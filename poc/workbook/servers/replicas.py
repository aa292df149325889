"""Several gateway replicas sharing a real Redis registry, with connectors, as real processes on loopback."""

from __future__ import annotations

import random
import secrets
import signal
import threading
import time
from pathlib import Path

from ...config import TenantCredentials
from .redis_server import RedisServer
from .runner import Component, ComponentError, Started, TlsFiles, get_json, start_component, stop_all, wait_all_ready


class Replicas(Started):
    """`with Replicas(workdir, tenants, data, count=3) as r:` — a redis-server, `count` gateways
    (`gw-1`…) on free ports with `--registry`, and `connect(tenant, i)` to start a tenant's connector
    against gateway i. Everything is stopped by PID on exit, also when the block fails."""

    def __init__(self, workdir: str | Path, tenants: dict[str, TenantCredentials], data: str | Path | dict, count: int = 3,
                 registry_ttl_s: float = 3.0, gateway_args: tuple[str, ...] = ("--rebalance-s", "1"),
                 delay_ms: str = "0", tls: TlsFiles | None = None, tunnel: str = "websocket") -> None:
        self.workdir = Path(workdir)
        self.tenants = tenants
        self.data = {t: Path(p) for t, p in data.items()} if isinstance(data, dict) else Path(data)  # or per tenant
        self.count = count
        self.registry_ttl_s = registry_ttl_s
        self.gateway_args = list(gateway_args)
        self.delay_ms = delay_ms
        self.tls = tls  # wss:// tunnels, grpc+tls:// Flight, also between replicas
        self.tunnel = tunnel  # what connectors dial: "websocket" (/connect) or "flight" (the Flight tunnel's port)
        self.redis = RedisServer(self.workdir / "redis")
        self.tenants_file = self.workdir / "tenants.yaml"
        self.admin_token = secrets.token_hex(16)
        self.env = {"POC_ADMIN_TOKEN": self.admin_token, "POC_TICKET_SECRET": secrets.token_hex(24),
                    "POC_PEER_SECRET": secrets.token_hex(24)}
        self.gateways: dict[str, Component] = {}
        self.connectors: dict[str, Component] = {}
        self.reserved: dict[str, dict] = {}  # replicas not started yet: their ports, so connectors can know them
        self.hosts: dict[str, str] = {}  # replica → the loopback address it listens on

    def start(self) -> None:
        self.prepare()
        self.redis.start()
        wait_all_ready([self.start_gateway(f"gw-{i}", wait=False) for i in range(1, self.count + 1)])

    def reserve(self, gateway_id: str) -> dict:
        """Free ports for a replica to be started later (`start_gateway` takes them)."""
        from .redis_server import _free_port

        self.reserved[gateway_id] = {"ws_port": _free_port(), "flight_port": _free_port(), "http_port": _free_port(),
                                     "flight_tunnel_port": _free_port()}
        return self.reserved[gateway_id]

    def start_gateway(self, gateway_id: str, ports: dict | None = None, host: str = "127.0.0.1",
                      wait: bool = True) -> Component:
        """Start (or start again, on the same ports when `ports` is given) the replica `gateway_id` on `host`
        (any 127.x.y.z address is loopback); `wait=False` returns before its ready line (`wait_all_ready`)."""
        ports = ports or self.reserved.pop(gateway_id, {})
        self.hosts[gateway_id] = host
        args = ["gateway", "--tenants", str(self.tenants_file), "--registry", self.redis.url, "--host", host,
                "--gateway-id", gateway_id, "--registry-ttl-s", str(self.registry_ttl_s),
                "--ws-port", str(ports.get("ws_port", 0)), "--flight-port", str(ports.get("flight_port", 0)),
                "--http-port", str(ports.get("http_port", 0)),
                "--flight-tunnel-port", str(ports.get("flight_tunnel_port", 0)) if self.tunnel == "flight" else "-1",
                *self.gateway_args,
                *((*self.tls.server_args(), "--peer-ca-file", str(self.tls.ca)) if self.tls else ())]
        component = start_component(gateway_id, args, self.log_dir, env=self.env, wait=wait)
        self.gateways[gateway_id] = component
        return component

    def tunnel_url(self, gateway_id: str) -> str:
        ports = self.gateways[gateway_id].ready if gateway_id in self.gateways else self.reserved[gateway_id]
        host = self.hosts.get(gateway_id, "127.0.0.1")
        if self.tunnel == "flight":
            return f"{'flight+tls' if self.tls else 'flight'}://{host}:{ports['flight_tunnel_port']}"
        return f"{'wss' if self.tls else 'ws'}://{host}:{ports['ws_port']}/connect"

    def connect(self, tenant_id: str, *gateway_ids: str, tunnels: int | None = None, name: str | None = None,
                urls: tuple[str, ...] = (), launcher: tuple[str, ...] = (), wait: bool = True) -> Component:
        """Start a connector for `tenant_id` that dials the replicas `gateway_ids` (each a --gateway), or
        `urls` as given; `wait=False` returns before its ready line (`wait_all_ready`)."""
        dial = [arg for url in (*(self.tunnel_url(g) for g in gateway_ids), *urls) for arg in ("--gateway", url)]
        data = self.data[tenant_id] if isinstance(self.data, dict) else self.data
        component = start_component(
            name or f"connector-{tenant_id}",
            ["connector", *dial, "--tenant", tenant_id, "--data", str(data), "--delay-ms", self.delay_ms,
             "--heartbeat-s", "1", *(("--tunnels", str(tunnels)) if tunnels else ()),
             *(("--ca-file", str(self.tls.ca)) if self.tls else ())],
            self.log_dir, env={"POC_CONNECTOR_TOKEN": self.tenants[tenant_id].connector_token}, launcher=launcher,
            wait=wait)
        self.connectors[component.name] = component
        return component

    def flight_uri(self, gateway_id: str) -> str:
        scheme = "grpc+tls" if self.tls else "grpc"
        return f"{scheme}://{self.hosts[gateway_id]}:{self.gateways[gateway_id].ready['flight_port']}"

    def gateway_at(self, flight_uri: str) -> str | None:
        """The replica whose Flight location this is."""
        return next((g for g, c in self.gateways.items() if c.ready and self.flight_uri(g) == flight_uri), None)

    def health(self, gateway_id: str) -> dict:
        port = self.gateways[gateway_id].ready["http_port"]
        return get_json(f"http://{self.hosts[gateway_id]}:{port}/health", token=self.admin_token)

    def ready(self, gateway_id: str) -> tuple[int, dict]:
        """GET /readyz of a replica: (status, body)."""
        import json
        import urllib.error
        import urllib.request

        port = self.gateways[gateway_id].ready["http_port"]
        try:
            with urllib.request.urlopen(f"http://{self.hosts[gateway_id]}:{port}/readyz", timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def wait_routable(self, tenant_ids: list[str], timeout: float = 30.0) -> None:
        """Wait until every replica's /health shows each tenant online (here or on another replica)."""
        deadline = time.monotonic() + timeout
        view: dict = {}
        while time.monotonic() < deadline:
            views = {g: self.health(g)["tenants"] for g in self.gateways if self.gateways[g].popen.poll() is None}
            if all(v.get(t, {}).get("status") == "online" for v in views.values() for t in tenant_ids):
                return
            view = views
            time.sleep(0.1)
        raise ComponentError(f"tenants {tenant_ids} not routable from every replica after {timeout:.0f} s: {view}")

    def restart(self, gateway_id: str) -> Component:
        """SIGTERM a replica (it drains), then start it again on the same ports."""
        component = self.gateways[gateway_id]
        ports = component.ready
        component.stop(60)
        return self.start_gateway(gateway_id, ports, self.hosts[gateway_id])

    def kill(self, gateway_id: str) -> None:
        """SIGKILL a replica: no drain, no goodbye."""
        component = self.gateways[gateway_id]
        component.popen.send_signal(signal.SIGKILL)
        component.popen.wait(10)

    def stop(self) -> None:
        """The connectors together, then the replicas together (each drains for `--drain-delay-s`), then Redis."""
        stop_all(list(self.connectors.values()))
        stop_all(list(self.gateways.values()))
        self.redis.stop()


class LoadLoop:
    """Readers in threads that loop GetFlightInfo + DoGet for the tenants, each call through a replica that
    answers /readyz (as a load balancer would pick one), until stopped; every call is recorded."""

    def __init__(self, replicas: Replicas, tenant_ids: list[str], through: list[str] | None = None,
                 readers: int = 3, max_seconds: float = 120.0, following: int = 0, check_ready: bool = True,
                 tables: dict | None = None) -> None:
        self.replicas = replicas
        self.tables = tables or {}  # tenant → the table it must read exactly (content, not only its rows)
        self.tenant_ids = tenant_ids
        self.through = through  # None: every replica started so far
        self.following = following  # this many readers follow endpoint locations; the others ignore them
        self.check_ready = check_ready  # False: call replicas whatever their /readyz says
        self.readers = readers
        self.max_seconds = max_seconds  # every loop stops by itself
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "LoadLoop":
        for i in range(self.readers):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _pick(self, rng: random.Random) -> str | None:
        ready = [g for g in (self.through or list(self.replicas.gateways))
                 if self.replicas.gateways[g].popen.poll() is None and (not self.check_ready or self._ready(g))]
        return rng.choice(ready) if ready else None

    def _ready(self, gateway_id: str) -> bool:
        try:
            return self.replicas.ready(gateway_id)[0] == 200
        except OSError:
            return False

    def _loop(self, index: int) -> None:
        import pyarrow.flight as flight

        rng = random.Random(index)
        follow = index < self.following
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            tenant = self.tenant_ids[rng.randrange(len(self.tenant_ids))]
            gateway = self._pick(rng)
            if gateway is None:
                time.sleep(0.05)
                continue
            token = self.replicas.tenants[tenant].client_token
            options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=30)
            record = {"start": time.time(), "tenant": tenant, "through": gateway, "read_from": gateway,
                      "follows_locations": follow, "rows": 0, "expected": None, "error": None, "exact": None}
            try:
                with flight.connect(self.replicas.flight_uri(gateway)) as client:
                    info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), options)
                    record["expected"] = info.total_records
                    [endpoint] = info.endpoints
                    if follow and endpoint.locations:
                        uri = endpoint.locations[0].uri.decode()
                        record["read_from"] = self.replicas.gateway_at(uri) or uri
                        with flight.connect(uri) as owner:
                            table = owner.do_get(endpoint.ticket, options).read_all()
                    else:
                        table = client.do_get(endpoint.ticket, options).read_all()
                    record["rows"] = table.num_rows
                    if tenant in self.tables:
                        record["exact"] = table.equals(self.tables[tenant])
            except Exception as exc:  # recorded: the test decides what may fail
                record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            record["end"] = time.time()
            with self._lock:
                self.records.append(record)

    def failed(self, since: float = 0.0) -> list[dict]:
        """Calls started at or after `since` that ended in an error."""
        return [r for r in self.records if r["error"] is not None and r["start"] >= since]

    def short(self) -> list[dict]:
        """Calls that ended without an error but with fewer rows than GetFlightInfo announced, or (given the
        tenants' tables) with another table than the tenant's: never allowed."""
        return [r for r in self.records if r["error"] is None and (r["rows"] != r["expected"] or r["exact"] is False)]
