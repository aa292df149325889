"""A connector written from docs/protocol.md alone (plain websockets + pyarrow, none of poc's code) works."""

from __future__ import annotations

import base64
import datetime
import json
import re
import struct
import threading

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import pyarrow.parquet as pq
from websockets.sync.client import connect

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, read, sales
from tests.integration.test_sql import connect as adbc_connect
from tests.integration.test_sql import query as adbc_query


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


def values(params: list[dict] | None) -> list | None:
    """§3d: the typed values as Python values for the engine."""
    if params is None:
        return None
    read = {"null": lambda v: None, "bool": bool, "int": int, "float": float, "string": str,
            "binary": base64.b64decode, "date": datetime.date.fromisoformat,
            "timestamp": datetime.datetime.fromisoformat}
    return [read[p["type"]](p.get("value")) for p in params]


def doc_connector(url: str, tenant: str, token: str, table: pa.Table, ready: threading.Event, stop: threading.Event,
                  codecs: list[str] | None = None, sql: str | None = None):
    """§2 register, §3 answer requests, §4 frames, §5 credit; with `codecs` (1.4): §4b, §5b; with `sql` (1.5):
    §3b, its queries run by its own engine (DuckDB over the table); and from "1.7" with their values bound (§3d)."""
    with connect(url, compression=None, max_size=2**20) as ws:
        register = {"action": "register", "tenant_id": tenant, "token": token, "version": "1", "datasets": ["sales"]}
        if codecs is not None:
            register["codecs"] = codecs
        if sql:
            register["sql"] = "duckdb"
            if sql == "1.7":
                register["max_params"] = 8
            engine = duckdb.connect()
            engine.register("sales", table)
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
            elif msg["action"] == "query_info":
                count = len(duckdb.extract_statements(msg["sql"])[0].named_parameters)
                bound = values(msg.get("params")) or [None] * count or None  # described before values are known
                result = engine.sql(msg["sql"], params=bound).limit(0).to_arrow_table()
                reply = {"action": "flight_info", "request_id": msg["request_id"], "rows": -1, "bytes": -1,
                         "schema": base64.b64encode(result.schema.serialize()).decode()}
                if sql == "1.7":
                    parameters = pa.schema([(f"p{i}", pa.null()) for i in range(count)])
                    reply["parameters"] = base64.b64encode(parameters.serialize()).decode()
                ws.send(json.dumps(reply))
            elif msg["action"] in ("do_get", "query"):
                sid = msg["request_id"]
                credit[sid] = msg["window"]
                if msg["action"] == "query":
                    result = engine.sql(msg["sql"], params=values(msg.get("params"))).to_arrow_table()
                    stream = [(1, result.schema.serialize())] + [(2, b.serialize()) for b in result.to_batches(rows)]
                    stream = [(kind, payload, payload.size) for kind, payload in stream]
                else:
                    stream = [(1, schema, schema.size)] + [(2, m, c) for m, c in messages]
                for kind, payload, cost in stream:
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


@pytest.mark.parametrize("codecs, sql", [(None, None), (["zstd"], None), ([], "1.5"), ([], "1.7")],
                         ids=["1.3", "1.4-zstd", "1.5-sql", "1.7-params"])
def test_a_connector_written_from_the_protocol_page_serves_flight_clients(tmp_path, tenants, datasets, codecs, sql):
    table = pq.read_table(datasets["small"] / "sales.parquet")
    args = ("--window-bytes", str(512 << 10), "--max-frame-bytes", str(256 << 10))  # forces many credit grants
    with Cluster(tmp_path, tenants, datasets["small"], gateway_args=args, with_connectors=False,
                 with_direct=False) as c:
        ready, stop = threading.Event(), threading.Event()
        creds = tenants["tenant_001"]
        thread = threading.Thread(target=doc_connector,
                                  args=(c.websocket_url, "tenant_001", creds.connector_token, table, ready, stop,
                                        codecs, sql))
        thread.start()
        try:
            assert ready.wait(10)
            info, got = read(c.flight_uri, creds.client_token)
            assert info.total_records == table.num_rows
            assert got.equals(table)
            assert c.health()["tenants"]["tenant_001"]["codec"] == (codecs[0] if codecs else None)
            if sql:  # a Flight SQL client's query runs at this connector (§3b)
                query = "SELECT id, amount FROM sales WHERE id % 10 = 3 ORDER BY id"
                got = adbc_query(c.flight_uri, creds.client_token, query)
                here = duckdb.connect()
                here.register("sales", table)
                assert got.num_rows > 0 and got.equals(here.sql(query).to_arrow_table())
            if sql == "1.7":  # … with its values bound (§3d)
                query = "SELECT id, amount FROM sales WHERE id % ? = ? AND amount > ? ORDER BY id"
                with adbc_connect(c.flight_uri, creds.client_token) as conn, conn.cursor() as cursor:
                    assert len(cursor.adbc_prepare(query)) == 3
                    cursor.execute(query, (10, 3, 2500.5))
                    got = cursor.fetch_arrow_table()
                assert got.num_rows > 0 and got.equals(here.sql(query, params=[10, 3, 2500.5]).to_arrow_table())
        finally:
            stop.set()
            thread.join(10)



FINGERPRINT = "doc-table-1"  # §6a: names the exact data this connector serves


def resuming_doc_connector(url: str, tenant: str, token: str, table: pa.Table, ready: threading.Event,
                           stop: threading.Event, cut: threading.Event, reconnected: threading.Event):
    """§6a from the page alone: register with `resume`, name each stream `resumable` before its SCHEMA, and
    answer a `do_get` with `from_row` with the rows from there on. When `cut` is set, the socket is dropped
    without a close (as a proxy restart does) and the connector dials again."""
    import socket

    while not stop.is_set():
        with connect(url, compression=None, max_size=2**20) as ws:
            ws.send(json.dumps({"action": "register", "tenant_id": tenant, "token": token, "version": "1",
                                "datasets": ["sales"], "resume": True}))
            hello = json.loads(ws.recv())
            assert hello["action"] == "registered" and hello.get("resume") is True
            rows = max(1, table.num_rows * hello["max_frame_bytes"] // (2 * table.nbytes))
            credit: dict[int, int] = {}
            if ready.is_set():
                reconnected.set()
            ready.set()

            def next_message() -> dict | None:
                if cut.is_set():
                    cut.clear()
                    ws.socket.shutdown(socket.SHUT_RDWR)  # dropped, no close frame
                    raise ConnectionError("cut")
                try:
                    return json.loads(ws.recv(timeout=0.2))
                except TimeoutError:
                    return None

            def handle(msg: dict | None) -> None:
                if msg is None:
                    return
                if msg["action"] == "credit":
                    credit[msg["request_id"]] = credit.get(msg["request_id"], 0) + msg["bytes"]
                elif msg["action"] == "get_flight_info":
                    schema = table.schema.serialize()
                    ws.send(json.dumps({"action": "flight_info", "request_id": msg["request_id"], "rows": -1,
                                        "bytes": -1, "schema": base64.b64encode(schema).decode()}))
                elif msg["action"] == "do_get":
                    sid, start = msg["request_id"], msg.get("from_row", 0)
                    if msg.get("fingerprint") not in (None, FINGERPRINT):
                        ws.send(json.dumps({"action": "error", "request_id": sid, "code": "unavailable",
                                            "message": "the data changed"}))
                        return
                    credit[sid] = msg["window"]
                    ws.send(json.dumps({"action": "resumable", "request_id": sid, "fingerprint": FINGERPRINT}))
                    schema = table.schema.serialize()
                    stream = [(1, schema)] + [(2, b.serialize()) for b in table.slice(start).to_batches(rows)]
                    for kind, payload in stream:
                        while credit[sid] < payload.size:
                            handle(next_message())
                        credit[sid] -= payload.size
                        ws.send(struct.pack("!B3xI", kind, sid) + payload.to_pybytes())
                    ws.send(struct.pack("!B3xI", 3, sid))

            try:
                while not stop.is_set():
                    handle(next_message())
            except ConnectionError:
                continue


def test_a_connector_written_from_the_protocol_page_resumes_a_stream_its_dropped_tunnel_cut(tmp_path, tenants,
                                                                                            datasets):
    """1,000,000 rows: far more than the windows and the client's buffers hold, so most of the table is still at
    the connector when its tunnel is cut."""
    table = pq.read_table(datasets["large"] / "sales.parquet")
    args = ("--window-bytes", str(2 << 20), "--max-frame-bytes", str(1 << 20))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_connectors=False,
                 with_direct=False) as c:
        ready, stop, cut, reconnected = (threading.Event() for _ in range(4))
        creds = tenants["tenant_001"]
        thread = threading.Thread(target=resuming_doc_connector,
                                  args=(c.websocket_url, "tenant_001", creds.connector_token, table, ready, stop, cut,
                                        reconnected))
        thread.start()
        try:
            assert ready.wait(10)
            with flight.connect(c.flight_uri) as client:
                info = client.get_flight_info(sales(), bearer(creds.client_token))
                reader = client.do_get(info.endpoints[0].ticket, bearer(creds.client_token, timeout=60))
                batches = [reader.read_chunk().data]  # then it stops reading: the rest waits at the connector
                cut.set()
                assert reconnected.wait(30)
                batches += [chunk.data for chunk in reader]
            assert pa.Table.from_batches(batches).equals(table)  # the whole table, once, in order
            assert re.search(r"stream of 'sales' resumed from row [1-9]\d*", c.gateway.log_tail(200))
        finally:
            stop.set()
            thread.join(10)
