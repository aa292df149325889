"""A Flight tunnel connector written from docs/protocol.md §13 alone (pyarrow.flight and JSON, none of poc's code)
serves Flight clients. Runs once: it does not depend on a WebSocket library."""

from __future__ import annotations

import base64
import json
import queue
import threading

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

from poc.workbook.servers.runner import Cluster
from tests.helpers import read


def doc_flight_connector(url: str, tenant: str, token: str, table: pa.Table, ready: threading.Event,
                         stop: threading.Event):
    """§13 alone: a Flight client (pyarrow.flight) with the token in its headers; the control call's messages as
    app_metadata; each stream on a data call of its own, its IPC messages as app_metadata, then `end`."""
    client = flight.connect(url.replace("flight://", "grpc://"))
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode()),
                                                (b"tunnel-tenant", tenant.encode())])
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"poc.tunnel.v1.control"), options)
    inbox: queue.Queue = queue.Queue()

    def receive():
        try:
            while True:
                inbox.put(reader.read_chunk().app_metadata.to_pybytes())
        except (StopIteration, flight.FlightError):
            inbox.put(None)

    def send(message: dict) -> None:
        writer.write_metadata(pa.py_buffer(json.dumps(message).encode()))

    threading.Thread(target=receive, daemon=True).start()
    send({"action": "register", "tenant_id": tenant, "token": token, "version": "1", "datasets": ["sales"]})
    hello = json.loads(inbox.get(timeout=10))
    assert hello["action"] == "registered" and hello["status"] == "ok"
    rows = max(1, table.num_rows * hello["max_frame_bytes"] // (2 * table.nbytes))
    schema = table.schema.serialize()
    batches = [b.serialize() for b in table.to_batches(max_chunksize=rows)]
    ready.set()
    while not stop.is_set():
        try:
            raw = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if raw is None or raw.startswith(b"close "):
            break
        msg = json.loads(raw)
        if msg["action"] == "get_flight_info":
            send({"action": "flight_info", "request_id": msg["request_id"], "rows": table.num_rows,
                  "schema": base64.b64encode(schema).decode(), "bytes": schema.size + sum(b.size for b in batches)})
        elif msg["action"] == "do_get":
            command = json.dumps({"session_id": hello["session_id"], "request_id": msg["request_id"]}).encode()
            data, done = client.do_exchange(flight.FlightDescriptor.for_command(command), options)
            for payload in (schema, *batches, pa.py_buffer(b"end")):
                data.write_metadata(payload)
            data.done_writing()
            try:
                done.read_chunk()  # the gateway ends the call once it has the stream
            except StopIteration:
                pass
            data.close()
    writer.done_writing()  # ends the link: the gateway answers `close` and ends the call
    writer.close()
    client.close()


def test_a_flight_connector_written_from_section_13_serves_flight_clients(tmp_path, tenants, datasets):
    table = pq.read_table(datasets["small"] / "sales.parquet")
    args = ("--window-bytes", str(512 << 10), "--max-frame-bytes", str(256 << 10))  # a stream bigger than its window
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_connectors=False,
                 with_direct=False, tunnel="flight") as c:
        ready, stop = threading.Event(), threading.Event()
        creds = tenants["tenant_001"]
        thread = threading.Thread(target=doc_flight_connector,
                                  args=(c.tunnel_url(), "tenant_001", creds.connector_token, table, ready, stop))
        thread.start()
        try:
            assert ready.wait(10)
            results = [read(c.flight_uri, creds.client_token) for _ in range(2)]
        finally:
            stop.set()
            thread.join(10)
    assert all(info.total_records == table.num_rows and got.equals(table) for info, got in results)
