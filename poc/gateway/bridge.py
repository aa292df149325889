"""The bridge between Flight's gRPC threads and the gateway's asyncio loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from collections.abc import Awaitable, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight

from .arrow_checks import DECODE_ERRORS, bounds_schema, read_schema
from .link import StreamItem, StreamSink, TenantLink
from .metrics import GatewayMetrics
from .registry import TenantRegistry



class NotHere(Exception):
    """`--registry`: the tenant has no tunnel this gateway may serve; route the call to another replica."""


STALE = "stale owner"


class TunnelBridge:
    """Called from gRPC threads; runs each step on the loop and waits for it with a deadline.

    Without `owner_check` a tenant's link is this gateway's or the tenant is offline. With one (`--registry`)
    a call may use a local link only if `owner_check(link, epoch)` confirms this gateway still owns it; a
    forwarded call (`peer`) must find the tunnel of its epoch here, any other call raises NotHere to be
    routed to another replica."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: TenantRegistry, timeout_s: float,
                 metrics: GatewayMetrics | None = None,
                 owner_check: Callable[[TenantLink, int | None], Awaitable[bool]] | None = None,
                 elsewhere: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.loop = loop
        self.registry = registry
        self.timeout_s = timeout_s
        self.metrics = metrics or GatewayMetrics()
        self.owner_check = owner_check
        self.elsewhere = elsewhere

    async def _live(self, tenant_id: str, epoch: int | None = None, leaving_ok: bool = False) -> TenantLink:
        """The link to serve the tenant's call from (on the loop); `epoch` is set for forwarded calls. While
        this replica drains, a client's call goes to another replica if the tenant has a tunnel there, and is
        served here (by the tunnel still open) if not."""
        if self.owner_check is None:
            return self.registry.live(tenant_id)
        if epoch is not None:  # a forwarded call: the tunnel of that epoch, whichever of the tenant's it is
            link = next((x for x in self.registry.tenant_links(tenant_id)
                         if x.epoch == epoch and x.closing_reason is None), None)
        else:
            link = self.registry.local(tenant_id, include_draining=True)
        if (link is not None and epoch is None and not leaving_ok and (self.registry.draining or link.moving)
                and self.elsewhere is not None and await self._elsewhere(tenant_id)):
            raise NotHere(tenant_id)  # this link is on its way out and the tenant has one on another replica
        if link is not None and await self.owner_check(link, epoch):
            return link
        if epoch is not None:
            raise flight.FlightUnavailableError(f"{STALE}: this gateway does not hold tenant {tenant_id}'s tunnel "
                                                f"of epoch {epoch} (any more)")
        raise NotHere(tenant_id)

    async def _elsewhere(self, tenant_id: str) -> bool:
        try:
            return await self.elsewhere(tenant_id)
        except Exception:  # the registry cannot say: serve here while the tunnel is open
            return False

    def run_on_loop(self, fn: Callable[[], object]):
        """Run `fn` on the gateway's loop in its next step and return what it returns (or raise what it
        raises), from a Flight thread: one turn of the loop, no coroutine, which under load is what a call's
        control path costs most (docs/results.md)."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        try:
            return done.result(self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            raise flight.FlightTimedOutError(f"gateway did not answer in {self.timeout_s:.0f} s") from None

    def await_on_loop(self, coro):
        """Run `coro` on the gateway's loop from a Flight thread and wait for it, within the request timeout."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s + 1)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise flight.FlightTimedOutError(f"gateway did not answer in {self.timeout_s:.0f} s") from None

    def datasets(self, tenant_id: str, epoch: int | None = None, leaving_ok: bool = False) -> tuple[list[str], int]:
        """The datasets the tenant's connector registered, and its tunnel's epoch."""
        if self.owner_check is None:
            link = self.run_on_loop(lambda: self.registry.live(tenant_id))
            return list(link.datasets), link.epoch

        async def ask():
            link = await self._live(tenant_id, epoch, leaving_ok)
            return list(link.datasets), link.epoch
        return self.await_on_loop(ask())

    def flight_info(self, tenant_id: str, dataset: str, trace_id: str | None = None,
                    epoch: int | None = None, leaving_ok: bool = False,
                    sql: str | None = None) -> tuple[pa.Schema, int, int, int]:
        """Schema, rows and IPC bytes of a tenant's dataset, asked of its connector, and the tunnel's epoch.
        `leaving_ok`: a link on its way out (draining, moving) will do (the other replicas could not serve).
        Without a registry the request is sent in the loop's next step and the connector's answer wakes this
        thread directly. Given `sql`, the schema of that query's result is asked instead (rows, bytes: -1)."""
        if self.owner_check is None:
            # One wait, one wake-up: the loop sends the request in its next step, and the connector's answer
            # (or the tenant being offline) is set on `answer` there. Under load each time a Flight thread
            # waits it must win the GIL back from every busy stream's thread (docs/results.md).
            answer: concurrent.futures.Future = concurrent.futures.Future()
            asked: list = []

            def ask_now() -> None:
                try:
                    link = self.registry.live(tenant_id)
                    asked.extend((link, link.ask_flight_info(dataset, trace_id, answer, sql)))
                except BaseException as exc:
                    answer.set_exception(exc)

            self.loop.call_soon_threadsafe(ask_now)
            try:
                reply = answer.result(self.timeout_s)
            except concurrent.futures.TimeoutError:
                if asked:
                    self.loop.call_soon_threadsafe(asked[0].forget_flight_info, asked[1])
                raise flight.FlightTimedOutError(f"connector of tenant {tenant_id} did not answer in "
                                                 f"{self.timeout_s:.0f} s") from None
            return reply.schema, reply.rows, reply.bytes, asked[0].epoch
        else:
            async def ask():
                link = await self._live(tenant_id, epoch, leaving_ok)
                return await link.flight_info(dataset, self.timeout_s, trace_id, sql), link.epoch
            reply, link_epoch = self.await_on_loop(ask())
        return reply.schema, reply.rows, reply.bytes, link_epoch

    def open_stream(self, tenant_id: str, dataset: str, cancelled: Callable[[], bool] = lambda: False,
                    trace_id: str | None = None, epoch: int | None = None,
                    leaving_ok: bool = False, sql: str | None = None) -> "TunnelStream":
        """Open a stream through the tenant's tunnel — a dataset's, or given `sql` that query's result — and
        wait for its schema (or for the client to leave)."""
        if self.owner_check is None:
            def start_now():
                link = self.registry.live(tenant_id)
                return (link, *link.open_stream(dataset, trace_id, sql))
            link, stream_id, sink = self.run_on_loop(start_now)
        else:
            async def start():
                link = await self._live(tenant_id, epoch, leaving_ok)
                return (link, *link.open_stream(dataset, trace_id, sql))
            link, stream_id, sink = self.await_on_loop(start())
        stream = TunnelStream(self, link, stream_id, sink, cancelled, dataset)
        stream.read_schema()
        return stream


def _cancel_on_loop(loop: asyncio.AbstractEventLoop, link: TenantLink, stream_id: int, reason: str) -> None:
    try:
        loop.call_soon_threadsafe(link.cancel, stream_id, reason)
    except RuntimeError:
        pass  # the loop is closed: the gateway is gone, and the link with it


class TunnelStream:
    """The Flight side of one tunnel stream: IPC messages in, validated record batches out, credit back.

    However the stream ends — END, an error, the client cancelling or leaving, its deadline, or Flight
    dropping a generator it never started — the link's stream is freed: `batches()` cancels in its
    `finally`, and a finalizer cancels when this object is collected without having run it."""

    def __init__(self, bridge: TunnelBridge, link: TenantLink, stream_id: int, sink: StreamSink,
                 cancelled: Callable[[], bool], dataset: str = "") -> None:
        self._bridge = bridge
        self.dataset = dataset
        metrics = bridge.metrics
        self._relayed_bytes = metrics.relayed_bytes.labels(link.tenant_id)
        self._relayed_rows = metrics.relayed_rows.labels(link.tenant_id)
        self._usage = metrics.usage
        self._link = link
        self.stream_id = stream_id
        self._sink = sink
        self._cancelled = cancelled
        self._grant_at = link.endpoint.grant_threshold
        self.schema: pa.Schema | None = None
        self._bounds: pa.Schema | None = None  # the schema batches are validated with (bounds, not UTF-8)
        self._done = False
        self._finalizer = weakref.finalize(self, _cancel_on_loop, bridge.loop, link, stream_id,
                                           "the Flight call ended before the stream started")

    def _next(self) -> tuple[str, object]:
        try:
            kind, value = self._sink.get(self._bridge.timeout_s, self._cancelled)
        except flight.FlightTimedOutError:
            self._cancel("timed out waiting for the connector")
            raise
        except flight.FlightCancelledError:
            self._cancel("the Flight client cancelled the call")
            raise
        if kind in (StreamItem.END, StreamItem.ERROR):
            self._done = True
            self._finalizer.detach()
        if kind == StreamItem.ERROR:
            raise value
        return kind, value

    def _grant(self, size: int) -> None:
        self._bridge.loop.call_soon_threadsafe(self._link.grant, self.stream_id, size)

    def _cancel(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._finalizer.detach()
            _cancel_on_loop(self._bridge.loop, self._link, self.stream_id, reason)

    def read_schema(self) -> None:
        kind, payload = self._next()
        if kind != StreamItem.SCHEMA:
            self._cancel("no schema")
            raise flight.FlightInternalError("connector ended the stream before sending its schema")
        try:
            self.schema = read_schema(payload, self._link.tenant_id)
        except flight.FlightError:
            self._cancel("invalid schema")
            raise
        bounds = bounds_schema(self.schema)
        self._bounds = self.schema if bounds.equals(self.schema) else bounds
        self._grant(len(payload))
        self._count(len(payload), 0, requests=1)  # a request counts once its connector served it a schema

    def _count(self, size: int, rows: int, requests: int = 0) -> None:
        """Relayed bytes (schema and batch messages, as on the wire) and rows, for metrics and billing."""
        self._relayed_bytes.inc(size)
        if rows:
            self._relayed_rows.inc(rows)
        self._usage.add(self._link.tenant_id, self.dataset, requests=requests, rows=rows, size=size)

    def _decode(self, payload, compressed: bool = False) -> pa.RecordBatch:
        """Read a batch in place and validate it before Flight's writer touches it: every buffer large enough
        for the claimed lengths, every offset in order and inside its data (docs/security.md). Both reads are
        zero-copy; a compressed body (§4b) is decompressed once, within the sizes the core already charged to
        the stream's credit, and its checked arrays are seen with the stream's own types rather than read (and
        decompressed) again. The cost is in docs/results.md."""
        try:
            message = pa.ipc.read_message(pa.py_buffer(payload))
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
            raise flight.FlightInternalError(f"connector of tenant {self._link.tenant_id} sent invalid Arrow "
                                             f"IPC: {str(exc)[:300]}") from None

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield each validated batch; grant credit as Flight takes them; cancel however it ends early."""
        consumed = 0
        try:
            while True:
                kind, value = self._next()
                if kind == StreamItem.END:
                    return
                payload, charge = value
                batch = self._decode(payload, compressed=charge != len(payload))
                yield batch
                self._count(len(payload), batch.num_rows)
                consumed += charge
                if consumed >= self._grant_at:
                    self._grant(consumed)
                    consumed = 0
        finally:
            self._cancel("the Flight client stopped reading")
