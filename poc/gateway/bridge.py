"""The bridge between Flight's gRPC threads and the gateway's asyncio loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from collections.abc import Callable, Iterator

import pyarrow as pa

from .. import errors
from .arrow_checks import DECODE_ERRORS, bounds_schema, read_schema
from .link import TenantLink
from .sinks import StreamItem, StreamSink
from .metrics import GatewayMetrics


class NotHere(Exception):
    """`--registry`: the tenant has no tunnel this gateway may serve; route the call to another replica."""


Picker = Callable[[object], object]  # who → their TenantLink, or an awaitable of it


class TunnelBridge:
    """Called from gRPC threads: each operation picks the caller's tenant link on the gateway's loop, runs its
    step there, and the thread waits once for the result, within a deadline.

    `pick(who)` names the link to serve a call from: alone, the tenant's live link here (poc.gateway.registry,
    at once); with replicas, a coroutine that first confirms this replica still owns the tunnel and raises
    NotHere when the call should go to another (poc.gateway.cluster). Every operation has one version for
    both: a link picked at once is used in the same turn of the loop, without a coroutine — under load a
    call's control path costs most in turns of the loop (docs/results.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pick: Picker, timeout_s: float,
                 metrics: GatewayMetrics | None = None) -> None:
        self.loop = loop
        self.pick = pick
        self.timeout_s = timeout_s
        self.metrics = metrics or GatewayMetrics()

    def _on_link(self, who, step: Callable[[TenantLink], object]) -> concurrent.futures.Future:
        """Pick `who`'s link on the loop, then `step(link)` there; the future holds what the step returned (or,
        when that is a future itself — an answer the connector will send — what that one gets)."""
        result: concurrent.futures.Future = concurrent.futures.Future()

        def proceed(link: TenantLink) -> None:
            try:
                value = step(link)
            except BaseException as exc:  # handed to the waiting thread
                result.set_exception(exc)
                return
            if isinstance(value, concurrent.futures.Future):
                value.add_done_callback(lambda done: _copy(done, result))
            else:
                result.set_result(value)

        def picked(task: asyncio.Future) -> None:
            if task.cancelled():
                result.cancel()
            elif task.exception() is not None:
                result.set_exception(task.exception())
            else:
                proceed(task.result())

        def start() -> None:
            try:
                link = self.pick(who)
            except BaseException as exc:
                result.set_exception(exc)
                return
            if isinstance(link, TenantLink):
                proceed(link)
            else:  # a replica confirms it still owns the tunnel first
                self.loop.create_task(link).add_done_callback(picked)

        self.loop.call_soon_threadsafe(start)
        return result

    def _wait(self, future: concurrent.futures.Future, timeout_s: float, what: str):
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise errors.TimedOut(f"{what} did not answer in {self.timeout_s:.0f} s") from None

    def await_on_loop(self, coro):
        """Run `coro` on the gateway's loop from a Flight thread and wait for it, within the request timeout."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise errors.TimedOut(f"gateway did not answer in {self.timeout_s:.0f} s") from None

    def datasets(self, who) -> tuple[list[str], int]:
        """The datasets the tenant's connector registered, and its tunnel's epoch."""
        future = self._on_link(who, lambda link: (list(link.datasets), link.epoch))
        return self._wait(future, self.timeout_s + 1, "gateway")

    def flight_info(self, who, dataset: str, sql: str | None = None,
                    params: list | None = None) -> tuple[pa.Schema, int, int, int]:
        """Schema, rows and IPC bytes of a tenant's dataset, asked of its connector, and the tunnel's epoch; given
        `sql` (and `params` bound to it), the schema of that query's result instead (rows, bytes: -1). The
        connector's answer (or the tenant being offline) wakes this thread directly: one wait, one wake-up."""
        reply, epoch = self.ask_info(who, dataset, sql, params)
        return reply.schema, reply.rows, reply.bytes, epoch

    def ask_info(self, who, dataset: str, sql: str | None = None, params: list | None = None):
        """The connector's whole flight_info (poc.gateway.link.FlightInfoReply) and the tunnel's epoch."""
        answer: concurrent.futures.Future = concurrent.futures.Future()
        asked: list = []

        def ask(link: TenantLink) -> concurrent.futures.Future:
            asked.extend((link, link.ask_flight_info(dataset, who.request_id, answer, sql, params)))
            return answer

        try:
            reply = self._wait(self._on_link(who, ask), self.timeout_s, f"connector of tenant {who.tenant_id}")
        except errors.TimedOut:
            if asked:
                self.loop.call_soon_threadsafe(asked[0].forget_flight_info, asked[1])
            raise
        return reply, asked[0].epoch

    def open_stream(self, who, dataset: str, cancelled: Callable[[], bool] = lambda: False,
                    sql: str | None = None, params: list | None = None, resume=None) -> "TunnelStream":
        """Open a stream through the tenant's tunnel — a dataset's, or given `sql` that query's result, with
        `params` bound, or given `resume` (poc.gateway.peer_resume.ResumeTicket) a dataset's from a row for
        another replica, which counts it — and wait for its schema (or for the client to leave)."""
        future = self._on_link(who, lambda link: (link, *link.open_stream(dataset, who.request_id, sql, params,
                                                                            resume)))
        link, _, sink = self._wait(future, self.timeout_s + 1, "gateway")
        stream = TunnelStream(self, link, sink, cancelled, dataset, counted=resume is None)
        stream.read_schema()
        return stream


def _in_arrow_memory(payload) -> bool:
    """Whether a frame's payload is a view of an Arrow buffer (as picows' frames are copied into): dropped in any
    thread, it is freed there without Python."""
    return isinstance(payload, memoryview) and isinstance(payload.obj, pa.Buffer)


def _as_arrow(payload) -> pa.Buffer:
    """A payload as an Arrow buffer, without a copy: the slice of its frame's Arrow buffer that it views, or a
    view of Python's bytes."""
    view = pa.py_buffer(payload)
    if _in_arrow_memory(payload):
        whole = payload.obj
        return whole.slice(view.address - whole.address, view.size)
    return view


def _copy(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def _cancel_on_loop(loop: asyncio.AbstractEventLoop, sink: StreamSink, reason: str) -> None:
    try:
        loop.call_soon_threadsafe(_cancel_route, sink, reason)
    except RuntimeError:
        pass  # the loop is closed: the gateway is gone, and the link with it


def _cancel_route(sink: StreamSink, reason: str) -> None:
    """On the loop: stop the stream at whichever link feeds the sink now (a resumed stream moves, docs/protocol.md
    §6a); a stream waiting to resume stops waiting."""
    if sink.route is None:
        sink.cancelled = True
        return
    link, stream_id = sink.route
    link.cancel(stream_id, reason)


def _grant_route(sink: StreamSink, size: int) -> None:
    """On the loop: credit back at whichever link feeds the sink now; nothing while it waits to resume."""
    if sink.route is not None:
        link, stream_id = sink.route
        link.grant(stream_id, size)


class TunnelStream:
    """The Flight side of one tunnel stream: IPC messages in, validated record batches out, credit back.

    However the stream ends — END, an error, the client cancelling or leaving, its deadline, or Flight
    dropping a generator it never started — the link's stream is freed: `batches()` cancels in its
    `finally`, and a finalizer cancels when this object is collected without having run it."""

    def __init__(self, bridge: TunnelBridge, link: TenantLink, sink: StreamSink, cancelled: Callable[[], bool],
                 dataset: str = "", counted: bool = True) -> None:
        """`link`: the one the stream opened on, for its tenant and kind; which link and stream id feed the sink
        later (a resumed stream moves, docs/protocol.md §6a) is the sink's `route`. Not `counted`: another
        replica counts the request, its rows and bytes (it resumed there)."""
        self._bridge = bridge
        self.dataset = dataset
        metrics = bridge.metrics
        self._relayed_bytes = metrics.relayed_bytes.labels(link.tenant_id)
        self._relayed_rows = metrics.relayed_rows.labels(link.tenant_id)
        self._usage = metrics.usage
        self._counted = counted
        self._tenant_id = link.tenant_id
        self._sink = sink
        self._cancelled = cancelled
        # credit goes back by message, except where each stream's call has its own flow control (FlowSink)
        self._grants = not link.data_calls
        self._grant_at = link.endpoint.grant_threshold if self._grants else float("inf")
        self.schema: pa.Schema | None = None
        self._bounds: pa.Schema | None = None  # the schema batches are validated with (bounds, not UTF-8)
        self._done = False
        self._finalizer = weakref.finalize(self, _cancel_on_loop, bridge.loop, sink,
                                           "the Flight call ended before the stream started")

    def _next(self) -> tuple[str, object]:
        try:
            kind, value = self._sink.get(self._bridge.timeout_s, self._cancelled)
        except errors.TimedOut:
            self._cancel("timed out waiting for the connector")
            raise
        except errors.Cancelled:
            self._cancel("the Flight client cancelled the call")
            raise
        if kind in (StreamItem.END, StreamItem.ERROR):
            self._done = True
            self._finalizer.detach()
        if kind == StreamItem.ERROR:
            raise value
        return kind, value

    def _grant(self, size: int) -> None:
        if not self._grants:
            return
        self._bridge.loop.call_soon_threadsafe(_grant_route, self._sink, size)

    def _cancel(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._finalizer.detach()
            _cancel_on_loop(self._bridge.loop, self._sink, reason)

    def read_schema(self) -> None:
        kind, payload = self._next()
        if kind != StreamItem.SCHEMA:
            self._cancel("no schema")
            raise errors.Internal("connector ended the stream before sending its schema")
        try:
            self.schema = read_schema(payload, self._tenant_id)
        except errors.CallError:
            self._cancel("invalid schema")
            raise
        bounds = bounds_schema(self.schema)
        self._bounds = self.schema if bounds.equals(self.schema) else bounds
        self._grant(len(payload))
        self._count(len(payload), 0, requests=1)  # a request counts once its connector served it a schema

    def _count(self, size: int, rows: int, requests: int = 0) -> None:
        """Relayed bytes (schema and batch messages, as on the wire) and rows, for metrics and billing."""
        if not self._counted:
            return
        self._relayed_bytes.inc(size)
        if rows:
            self._relayed_rows.inc(rows)
        self._usage.add(self._tenant_id, self.dataset, requests=requests, rows=rows, size=size)

    def _decode(self, payload, compressed: bool = False) -> pa.RecordBatch:
        """Read a batch in place and validate it before Flight's writer touches it: every buffer large enough
        for the claimed lengths, every offset in order and inside its data (docs/security.md). Both reads are
        zero-copy; a compressed body (§4b) is decompressed once, within the sizes the core already charged to
        the stream's credit, and its checked arrays are seen with the stream's own types rather than read (and
        decompressed) again. The cost is in docs/results.md."""
        try:
            message = pa.ipc.read_message(_as_arrow(payload))
            checked = pa.ipc.read_record_batch(message, self._bounds)
            checked.validate(full=True)
            if self._bounds is self.schema:
                return checked
            if compressed:
                try:
                    return pa.RecordBatch.from_arrays([column.view(f.type) for column, f in
                                                       zip(checked.columns, self.schema)], schema=self.schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    pass
            return pa.ipc.read_record_batch(message, self.schema)
        except DECODE_ERRORS as exc:
            self._cancel("invalid Arrow IPC")
            raise errors.Internal(f"connector of tenant {self._tenant_id} sent invalid Arrow "
                                             f"IPC: {str(exc)[:300]}") from None

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield each validated batch; grant credit as Flight takes them; cancel however it ends early. A frame
        in Arrow's memory is let go as soon as Flight has taken its batch, so a stream waiting for its connector
        holds no frame (holding its last one cost 2.3 MB a stream at 100 streams, docs/results.md); one in
        Python's memory is held until the next arrives, since its last release, in a gRPC thread, would take
        the GIL."""
        consumed = 0
        try:
            while True:
                kind, value = self._next()
                if kind == StreamItem.END:
                    return
                payload, charge = value
                batch = self._decode(payload, compressed=charge != len(payload))
                size, rows = len(payload), batch.num_rows
                yield batch
                if _in_arrow_memory(payload):
                    value = payload = batch = None
                self._count(size, rows)
                consumed += charge
                if consumed >= self._grant_at:
                    self._grant(consumed)
                    consumed = 0
        finally:
            self._cancel("the Flight client stopped reading")
