"""The gateway's Prometheus metrics (docs/operations.md) and per-tenant usage for billing.

Names follow Prometheus conventions: base units, counters end in `_total`, few labels. `tenant` labels
only the relayed bytes and rows, where metering needs it; tenants come from the tenants file, so their
number is bounded by configuration, never by what peers send.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

CLOSE_CODES = {1000, 1001, 1005, 1006, 1009, 1011, 1013, 4000, 4001, 4002, 4003, 4004, 4005, 4006, 4007, 4008}


def close_label(code: int | None) -> str:
    """A close code as a label: the documented ones (docs/protocol.md §8) and "other", so that a peer
    choosing its own close codes cannot grow the number of series."""
    return str(code) if code in CLOSE_CODES else "other"


REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """One registry per gateway, so several gateways can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tunnels = Gauge("poc_gateway_tunnels", "Registered tunnels", ["transport"], registry=r)
        self.registrations = Counter("poc_gateway_registrations_total", "Registrations by result",
                                     ["result"], registry=r)
        self.streams_active = Gauge("poc_gateway_streams_active", "DoGet streams open through tunnels", registry=r)
        self.buffered_bytes = Gauge("poc_gateway_buffered_bytes",
                                    "Bytes reserved by open streams (their windows) against --max-buffered-bytes",
                                    registry=r)
        self.flight_requests = Counter("poc_gateway_flight_requests_total", "Flight calls by method and outcome",
                                       ["method", "outcome"], registry=r)
        self.flight_seconds = Histogram("poc_gateway_flight_request_seconds", "Flight call duration",
                                        ["method"], buckets=REQUEST_BUCKETS, registry=r)
        self.relayed_bytes = Counter("poc_gateway_relayed_bytes_total", "Arrow IPC bytes relayed to clients",
                                     ["tenant"], registry=r)
        self.relayed_rows = Counter("poc_gateway_relayed_rows_total", "Rows relayed to clients", ["tenant"],
                                    registry=r)
        self.streams_resumed = Counter("poc_gateway_streams_resumed_total",
                                       "Dataset streams cut off with their tunnel, by what became of them: resumed "
                                       "on the tenant's next tunnel (where it may still fail if its data changed), "
                                       "expired (no connector within --resume-window-s) or cancelled (the client "
                                       "left while it waited)",
                                       ["outcome"], registry=r)
        self.tunnel_closes = Counter("poc_gateway_tunnel_closes_total", "Tunnels closed, by close code",
                                     ["code"], registry=r)
        self.registry_up = Gauge("poc_gateway_registry_up",
                                 "1 while the shared registry (Redis, --registry) answers, 0 when it does not; "
                                 "1 without --registry", registry=r)
        self.registry_up.set(1)
        self.registry_errors = Counter("poc_gateway_registry_errors_total",
                                       "Registry (Redis) operations that failed", registry=r)
        self.forwarded = Counter("poc_gateway_forwarded_requests_total",
                                 "Flight calls forwarded to the replica that holds the tenant's tunnel, by outcome",
                                 ["method", "outcome"], registry=r)
        self.usage = Usage()


class ReplicaTunnels:
    """`poc_gateway_registry_tunnels{gateway}` (--registry): the tunnels every replica holds, as the shared
    registry's records say when scraped, so one replica's /metrics shows the whole cluster."""

    NAME = "poc_gateway_registry_tunnels"
    HELP = "Tunnels each replica holds, as the shared registry says (--registry)"

    def __init__(self, fetch) -> None:
        self._fetch = fetch  # () -> list of replica records {id, tunnels, ...}; may raise

    def describe(self):
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["gateway"])

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["gateway"])
        try:
            records = self._fetch()
        except Exception:  # the registry is down: poc_gateway_registry_up says so; no stale figures here
            records = []
        for record in records:
            family.add_metric([str(record.get("id"))], float(record.get("tunnels", 0)))
        yield family


class Usage:
    """Requests, rows and bytes per tenant and dataset since start: the JSON of GET /v1/usage.

    Entries are made only for streams a connector served (its schema arrived), and each tenant has at most
    `max_datasets` of them; past that, what it reads is counted under OTHER, so no client or connector can
    make this grow without bound by naming datasets."""

    OTHER = "(other)"

    def __init__(self, max_datasets: int = 1000) -> None:
        self._lock = threading.Lock()
        self._by = defaultdict(lambda: {"requests": 0, "rows": 0, "bytes": 0})
        self._datasets: dict[str, int] = {}  # tenant → its entries
        self.max_datasets = max_datasets

    def add(self, tenant: str, dataset: str, requests: int = 0, rows: int = 0, size: int = 0) -> None:
        with self._lock:
            key = (tenant, dataset)
            if key not in self._by:
                count = self._datasets.get(tenant, 0)
                if count >= self.max_datasets:
                    key = (tenant, self.OTHER)
                if key not in self._by:
                    self._datasets[tenant] = count + 1
            entry = self._by[key]
            entry["requests"] += requests
            entry["rows"] += rows
            entry["bytes"] += size

    def snapshot(self) -> dict:
        with self._lock:
            result: dict = {}
            for (tenant, dataset), entry in sorted(self._by.items()):
                result.setdefault(tenant, {})[dataset] = dict(entry)
            return result
