"""The bridge between Flight's gRPC threads and the gateway's asyncio loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from .link import StreamItem, StreamSink, TenantLink
from .registry import TenantRegistry


class TunnelBridge:
    """Called from gRPC threads; runs each step on the loop and waits for it with a deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: TenantRegistry, timeout_s: float) -> None:
        self.loop = loop
        self.registry = registry
        self.timeout_s = timeout_s

    def _on_loop(self, fn, *args):
        async def step():
            return fn(*args)
        return self._await(step())

    def _await(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise flight.FlightTimedOutError(f"gateway did not answer in {self.timeout_s:.0f} s") from None

    def datasets(self, tenant_id: str) -> list[str]:
        return list(self._on_loop(self.registry.live, tenant_id).datasets)

    def flight_info(self, tenant_id: str, dataset: str) -> tuple[pa.Schema, int, int]:
        """Schema, rows and IPC bytes of a tenant's dataset, asked of its connector."""
        async def ask():
            return await self.registry.live(tenant_id).flight_info(dataset, self.timeout_s)
        reply = self._await(ask())
        try:
            schema = pa.ipc.read_schema(pa.py_buffer(reply.schema))
        except pa.ArrowInvalid as exc:
            raise flight.FlightInternalError(f"connector of tenant {tenant_id} sent an invalid schema: {exc}") from None
        return schema, reply.rows, reply.bytes

    def open_stream(self, tenant_id: str, dataset: str) -> "TunnelStream":
        """Open a stream through the tenant's tunnel and wait for its schema."""
        def start():
            link = self.registry.live(tenant_id)
            return (link, *link.open_stream(dataset))
        link, stream_id, sink = self._on_loop(start)
        stream = TunnelStream(self, link, stream_id, sink)
        stream.read_schema()
        return stream


class TunnelStream:
    """The Flight side of one tunnel stream: IPC messages in, record batches out, credit back."""

    def __init__(self, bridge: TunnelBridge, link: TenantLink, stream_id: int, sink: StreamSink) -> None:
        self._bridge = bridge
        self._link = link
        self.stream_id = stream_id
        self._sink = sink
        self._grant_at = link.endpoint.limits.window_bytes // 4
        self.schema: pa.Schema | None = None
        self._done = False

    def _next(self) -> tuple[str, object]:
        try:
            kind, value = self._sink.get(self._bridge.timeout_s)
        except flight.FlightTimedOutError:
            self._cancel("timed out waiting for the connector")
            raise
        if kind in (StreamItem.END, StreamItem.ERROR):
            self._done = True
        if kind == StreamItem.ERROR:
            raise value
        return kind, value

    def _grant(self, size: int) -> None:
        self._bridge.loop.call_soon_threadsafe(self._link.grant, self.stream_id, size)

    def _cancel(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._bridge.loop.call_soon_threadsafe(self._link.cancel, self.stream_id, reason)

    def read_schema(self) -> None:
        kind, payload = self._next()
        if kind != StreamItem.SCHEMA:
            raise flight.FlightInternalError("connector ended the stream before sending its schema")
        self.schema = self._decode(lambda: pa.ipc.read_schema(pa.py_buffer(payload)))
        self._grant(len(payload))

    def _decode(self, read):
        try:
            return read()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            self._cancel("invalid Arrow IPC")
            raise flight.FlightInternalError(f"connector sent invalid Arrow IPC: {exc}") from None

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield each batch as read in place from the received frame; grant credit as Flight takes them."""
        consumed = 0
        try:
            while True:
                kind, payload = self._next()
                if kind == StreamItem.END:
                    return
                batch = self._decode(lambda: pa.ipc.read_record_batch(
                    pa.ipc.read_message(pa.py_buffer(payload)), self.schema))
                yield batch
                consumed += len(payload)
                if consumed >= self._grant_at:
                    self._grant(consumed)
                    consumed = 0
        finally:
            self._cancel("the Flight client stopped reading")
