"""A connector written from docs/protocol.md alone (plain websockets + pyarrow, none of poc's code) works."""

from __future__ import annotations

import base64
import json
import struct
import threading

import pyarrow as pa
import pyarrow.parquet as pq
from websockets.sync.client import connect

from poc.workbook.runner import Cluster
from tests.helpers import read


def doc_connector(url: str, tenant: str, token: str, table: pa.Table, ready: threading.Event, stop: threading.Event):
    """§2 register, §3 answer requests, §4 frames, §5 credit."""
    with connect(url, compression=None, max_size=2**20) as ws:
        ws.send(json.dumps({"action": "register", "tenant_id": tenant, "token": token, "version": "1",
                            "datasets": ["sales"]}))
        hello = json.loads(ws.recv())
        assert hello["action"] == "registered" and hello["status"] == "ok"
        rows = max(1, table.num_rows * hello["max_frame_bytes"] // (2 * table.nbytes))
        messages = [b.serialize() for b in table.to_batches(max_chunksize=rows)]
        schema = table.schema.serialize()
        credit: dict[int, int] = {}
        ready.set()

        def handle(msg: dict) -> None:
            if msg["action"] == "get_flight_info":
                ws.send(json.dumps({"action": "flight_info", "request_id": msg["request_id"],
                                    "schema": base64.b64encode(schema).decode(), "rows": table.num_rows,
                                    "bytes": schema.size + sum(m.size for m in messages)}))
            elif msg["action"] == "credit":
                credit[msg["request_id"]] = credit.get(msg["request_id"], 0) + msg["bytes"]
            elif msg["action"] == "do_get":
                sid = msg["request_id"]
                credit[sid] = msg["window"]
                for kind, payload in [(1, schema)] + [(2, m) for m in messages]:
                    while credit[sid] < payload.size:
                        handle(json.loads(ws.recv()))
                    credit[sid] -= payload.size
                    ws.send(struct.pack("!B3xI", kind, sid) + payload.to_pybytes())
                ws.send(struct.pack("!B3xI", 3, sid))

        while not stop.is_set():
            try:
                handle(json.loads(ws.recv(timeout=0.2)))
            except TimeoutError:
                continue


def test_a_connector_written_from_the_protocol_page_serves_flight_clients(tmp_path, tenants, datasets):
    table = pq.read_table(datasets["small"] / "sales.parquet")
    args = ("--window-bytes", str(512 << 10), "--max-frame-bytes", str(256 << 10))  # forces many credit grants
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_connectors=False,
                 with_direct=False) as c:
        ready, stop = threading.Event(), threading.Event()
        creds = tenants["tenant_001"]
        thread = threading.Thread(target=doc_connector,
                                  args=(c.websocket_url, "tenant_001", creds.connector_token, table, ready, stop))
        thread.start()
        try:
            assert ready.wait(10)
            info, got = read(c.flight_uri, creds.client_token)
            assert info.total_records == table.num_rows
            assert got.equals(table)
        finally:
            stop.set()
            thread.join(10)
