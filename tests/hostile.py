"""A hostile connector written from docs/protocol.md alone: plain `websockets` (or raw gRPC calls carrying
FlightData, §13) and bytes, so it can send whatever an attacker would. And the malformed Arrow IPC it sends."""

from __future__ import annotations

import base64
import json
import queue
import struct
import threading

import grpc
import numpy as np
import pyarrow as pa
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from poc.protowire import write_varint
from poc.transports import flight_tunnel

_END = object()


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A data frame of §4: `!B3xI` header then the payload."""
    return struct.pack("!B3xI", kind, stream_id) + payload


def flight_descriptor(command: bytes) -> bytes:
    """A FlightData carrying only a CMD descriptor (Flight.proto), as a Flight client's first message."""
    descriptor = b"\x08\x02\x12" + write_varint(len(command)) + command
    return b"\x0a" + write_varint(len(descriptor)) + descriptor


def flight_headers(tenant_id: str, token: str) -> tuple:
    return (("authorization", f"Bearer {token}"), (flight_tunnel.TENANT_HEADER, tenant_id))


class RawConnector:
    """One tunnel to the gateway over `transport` ("websocket" or "flight"); nothing is checked on our
    side. Over Flight (docs/protocol.md §13) the control call carries `headers` (by default none: give the
    tenant's token to get past the gateway's first check), and each §4 frame sent goes to its stream's data
    call — its payload as app_metadata, END as `end` — opened at the stream's first frame."""

    def __init__(self, url: str, transport: str, headers: tuple = ()) -> None:
        self.transport = transport
        self.close_code: int | None = None
        self.close_reason = ""
        self.session_id = ""
        if transport == "flight":
            self._headers = headers
            self._inbox = queue.Queue()
            self._data: dict[int, tuple[queue.Queue, object]] = {}
            self._channel = grpc.insecure_channel(url.split("://", 1)[1], options=[
                ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
            self._exchange = self._channel.stream_stream(f"/{flight_tunnel.SERVICE}/DoExchange")
            self._outbox = self._open_call(flight_tunnel.CONTROL)
            self._call = self._outbox[1]
            threading.Thread(target=self._read_flight, daemon=True).start()
        else:
            self._ws = connect(url, compression=None, max_size=None, open_timeout=10)

    def _open_call(self, command: bytes) -> tuple[queue.Queue, object]:
        outbox: queue.Queue = queue.Queue()
        outbox.put(flight_descriptor(command))
        return outbox, self._exchange(iter(outbox.get, _END), metadata=self._headers, timeout=120)

    def _read_flight(self) -> None:
        try:
            for message in self._call:
                _, metadata = flight_tunnel.read_flight_data(message)
                if bytes(metadata).startswith(flight_tunnel.CLOSE):
                    closed = flight_tunnel.read_close(bytes(metadata))
                    self.close_code, self.close_reason = closed.code, closed.reason
                else:
                    self._inbox.put(str(metadata, "utf-8"))
            if self.close_code is None:
                self.close_code, self.close_reason = 1006, "control call ended"
        except grpc.RpcError as exc:
            self.close_code, self.close_reason = 1006, f"{exc.code().name}: {exc.details()}"
        self._inbox.put(_END)

    def data_call(self, stream_id: int, command: bytes | None = None) -> tuple[queue.Queue, object]:
        """Flight: the data call of a stream (opened now if it is not: for `command`, by default this session's
        stream)."""
        if stream_id not in self._data:
            self._data[stream_id] = self._open_call(command or flight_tunnel.data_command(self.session_id,
                                                                                         stream_id))
        return self._data[stream_id]

    def send_on_control_call(self, message: bytes) -> None:
        """Flight: one raw FlightData on the control call."""
        self._outbox[0].put(message)

    def send_on_data_call(self, stream_id: int, message: bytes) -> None:
        """Flight: one raw FlightData on the stream's data call."""
        self.data_call(stream_id)[0].put(message)

    def send(self, item: str | bytes) -> None:
        """One message: text (str) or binary (bytes). A closed tunnel is not an error here."""
        if self.transport == "flight":
            if isinstance(item, str):
                self._outbox[0].put(flight_tunnel.metadata_message(item.encode()))
                return
            kind, stream_id = struct.unpack_from("!B3xI", item)
            payload = flight_tunnel.END if kind == 3 else item[8:]
            self.send_on_data_call(stream_id, flight_tunnel.metadata_message(payload))
            return
        try:
            self._ws.send(item)
        except ConnectionClosed:
            pass

    def send_fragments(self, fragments: list[str]) -> None:
        """One text message cut into fragments (WebSocket only)."""
        try:
            self._ws.send(iter(fragments))
        except ConnectionClosed:
            pass

    def recv(self, timeout: float = 10) -> dict:
        """The next control message from the gateway."""
        if self.transport == "flight":
            item = self._inbox.get(timeout=timeout)
            if item is _END:
                raise ConnectionError(f"tunnel closed ({self.close_code}): {self.close_reason}")
            return json.loads(item)
        return json.loads(self._ws.recv(timeout))

    def recv_until(self, action: str, timeout: float = 10) -> dict:
        while (message := self.recv(timeout))["action"] != action:
            pass
        return message

    def closed(self, timeout: float = 15) -> tuple[int, str]:
        """Wait for the gateway to close the tunnel; its close code and reason."""
        try:
            while True:
                self.recv(timeout)
        except (ConnectionClosed, ConnectionError):
            pass
        except queue.Empty:  # the connection stayed open: not closed
            return None, "still open"
        if self.transport != "flight":
            self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason
        return self.close_code, self.close_reason

    def register(self, tenant_id: str, token: str, datasets=("sales",)) -> dict:
        self.send(json.dumps({"action": "register", "tenant_id": tenant_id, "token": token, "version": "1",
                              "datasets": list(datasets)}))
        reply = self.recv()
        self.session_id = reply.get("session_id", "")
        return reply

    def answer_flight_info(self, schema: pa.Schema, rows: int = 10) -> None:
        request = self.recv_until("get_flight_info")
        self.send(json.dumps({"action": "flight_info", "request_id": request["request_id"], "rows": rows,
                              "bytes": 1000, "schema": base64.b64encode(schema.serialize().to_pybytes()).decode()}))

    def close(self) -> None:
        if self.transport == "flight":
            for outbox, _ in [self._outbox, *self._data.values()]:
                outbox.put(_END)
            self._channel.close()
        else:
            self._ws.close()


# -- malformed Arrow IPC, made from real messages

STRINGS = pa.schema([("value", pa.string())])
INTS = pa.schema([("id", pa.int64())])
ROWS = 4951  # a row count whose int64 bytes appear nowhere else in the message metadata


def strings_batch(rows: int = ROWS) -> bytes:
    return pa.record_batch([pa.array([f"value-{i:05d}" for i in range(rows)])], schema=STRINGS).serialize().to_pybytes()


def with_length(message: bytes, rows: int, claimed: int) -> bytes:
    """The message with every int64 `rows` of its metadata (the batch's length and its field nodes') made
    `claimed`: the data stays as it was."""
    meta_len = struct.unpack_from("<i", message, 4)[0]
    meta = message[8:8 + meta_len].replace(struct.pack("<q", rows), struct.pack("<q", claimed))
    return message[:8] + meta + message[8 + meta_len:]


def with_offset(message: bytes, index: int, value: int) -> bytes:
    """A one-string-column batch with offset `index` set to `value` (offsets start the body)."""
    meta_len = struct.unpack_from("<i", message, 4)[0]
    patched = bytearray(message)
    struct.pack_into("<i", patched, 8 + meta_len + 4 * index, value)
    return bytes(patched)


def compressed_zeros(mib: int) -> bytes:
    """A zstd-compressed batch of `mib` MiB of int64 zeros: a few KB on the wire."""
    batch = pa.record_batch([pa.array(np.zeros((mib << 20) // 8, dtype=np.int64))], schema=INTS)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, INTS, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_batch(batch)
    return list(pa.ipc.MessageReader.open_stream(sink.getvalue()))[1].serialize().to_pybytes()  # [0]: schema


def dictionary_messages() -> list[bytes]:
    """Schema, dictionary batch and record batch of a dictionary-encoded column."""
    batch = pa.record_batch({"value": pa.array(["a", "b", "a"]).dictionary_encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return [m.serialize().to_pybytes() for m in pa.ipc.MessageReader.open_stream(sink.getvalue())]
