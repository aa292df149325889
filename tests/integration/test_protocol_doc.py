"""A connector written from docs/protocol.md alone (plain websockets + pyarrow, none of poc's code) works."""

from __future__ import annotations

import base64
import json
import struct
import threading

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from websockets.sync.client import connect

from poc.workbook.runner import Cluster
from tests.helpers import read


def compressed(batch: pa.RecordBatch, codec: str) -> tuple[pa.Buffer, int]:
    """§4b: the batch message with its body compressed, and a charge that is never below its true one (the
    payload plus the uncompressed message's size, as the page allows a connector that does not read its own
    buffers)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    reader.read_next_message()
    payload = reader.read_next_message().serialize()
    return payload, payload.size + batch.serialize().size


def doc_connector(url: str, tenant: str, token: str, table: pa.Table, ready: threading.Event, stop: threading.Event,
                  codecs: list[str] | None = None):
    """§2 register, §3 answer requests, §4 frames, §5 credit; with `codecs` (1.4): §4b, §5b."""
    with connect(url, compression=None, max_size=2**20) as ws:
        register = {"action": "register", "tenant_id": tenant, "token": token, "version": "1", "datasets": ["sales"]}
        if codecs is not None:
            register["codecs"] = codecs
        ws.send(json.dumps(register))
        hello = json.loads(ws.recv())
        assert hello["action"] == "registered" and hello["status"] == "ok"
        rows = max(1, table.num_rows * hello["max_frame_bytes"] // (2 * table.nbytes))
        batches = table.to_batches(max_chunksize=rows)
        codec = hello.get("codec")
        assert codec is None or codec in codecs
        # (payload, credit it costs) per batch: compressed when a codec was agreed and it fits a frame (§4b)
        messages = []
        for b in batches:
            plain = b.serialize()
            if codec is not None:
                payload, charge = compressed(b, codec)
                if charge <= hello["max_frame_bytes"]:
                    messages.append((payload, charge))
                    continue
            messages.append((plain, plain.size))
        schema = table.schema.serialize()
        credit: dict[int, int] = {}
        ready.set()

        def handle(msg: dict) -> None:
            if msg["action"] == "get_flight_info":
                ws.send(json.dumps({"action": "flight_info", "request_id": msg["request_id"],
                                    "schema": base64.b64encode(schema).decode(), "rows": table.num_rows,
                                    "bytes": schema.size + sum(p.size for p, _ in messages)}))
            elif msg["action"] == "credit":
                credit[msg["request_id"]] = credit.get(msg["request_id"], 0) + msg["bytes"]
            elif msg["action"] == "ping":
                ws.send(json.dumps({"action": "pong", "seq": msg["seq"]}))
            elif msg["action"] == "do_get":
                sid = msg["request_id"]
                credit[sid] = msg["window"]
                for kind, payload, cost in [(1, schema, schema.size)] + [(2, m, c) for m, c in messages]:
                    while credit[sid] < cost:
                        handle(json.loads(ws.recv()))
                    credit[sid] -= cost
                    ws.send(struct.pack("!B3xI", kind, sid) + payload.to_pybytes())
                ws.send(struct.pack("!B3xI", 3, sid))

        while not stop.is_set():
            try:
                handle(json.loads(ws.recv(timeout=0.2)))
            except TimeoutError:
                continue


@pytest.mark.parametrize("codecs", [None, ["zstd"]], ids=["1.3", "1.4-zstd"])
def test_a_connector_written_from_the_protocol_page_serves_flight_clients(tmp_path, tenants, datasets, codecs):
    table = pq.read_table(datasets["small"] / "sales.parquet")
    args = ("--window-bytes", str(512 << 10), "--max-frame-bytes", str(256 << 10))  # forces many credit grants
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_connectors=False,
                 with_direct=False) as c:
        ready, stop = threading.Event(), threading.Event()
        creds = tenants["tenant_001"]
        thread = threading.Thread(target=doc_connector,
                                  args=(c.websocket_url, "tenant_001", creds.connector_token, table, ready, stop,
                                        codecs))
        thread.start()
        try:
            assert ready.wait(10)
            info, got = read(c.flight_uri, creds.client_token)
            assert info.total_records == table.num_rows
            assert got.equals(table)
            assert c.health()["tenants"]["tenant_001"]["codec"] == (codecs[0] if codecs else None)
        finally:
            stop.set()
            thread.join(10)
