"""The connector's Prometheus metrics (docs/operations.md), served on --metrics-port when it is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ConnectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.registered = Gauge("poc_connector_registered", "1 while a tunnel is registered, else 0", registry=r)
        self.streams = Gauge("poc_connector_streams", "Streams being served", registry=r)
        self.requests = Counter("poc_connector_requests_total", "Requests from the gateway by kind", ["kind"],
                                registry=r)
        self.sent_bytes = Counter("poc_connector_sent_bytes_total", "Arrow IPC bytes sent in data frames",
                                  registry=r)
        self.reconnects = Counter("poc_connector_reconnects_total", "Links lost and dialled again", registry=r)
        self.compressed_batches = Counter("poc_connector_compressed_batches_total",
                                          "Batches sent with a compressed body (protocol §4b)", registry=r)
        self.queries = Gauge("poc_connector_queries", "Queries open in DuckDB or a database, and database reads of DoGets (running or paused for credit)",
                             registry=r)
        self.query_rows = Counter("poc_connector_query_rows_total", "Result rows of SQL queries sent", registry=r)
        self.link_rtt = Gauge("poc_connector_link_rtt_seconds",
                              "Smallest heartbeat round trip of the link to each gateway, while it is registered: "
                              "what --compression auto judges the link's distance by", ["gateway"], registry=r)
        self.credit_waits = Counter("poc_connector_credit_waits_total",
                                    "Times a stream had to wait for credit before its next frame", registry=r)
