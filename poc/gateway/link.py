"""A registered connector's link, seen from the gateway's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field

import pyarrow as pa

from .. import errors
from ..transports.base import TunnelTransport
from ..tunnel import events as ev
from ..tunnel import LocalProtocolError
from ..tunnel import GatewayEndpoint
from ..tunnel.limits import TokenBucket
from ..tunnel.messages import clip
from .arrow_checks import read_schema
from .shares import BufferBudget
from .sinks import FlowSink, StreamItem, StreamSink


@dataclass(frozen=True)
class FlightInfoReply:
    """A connector's flight_info, its schema read."""

    schema: pa.Schema
    rows: int
    bytes: int
    parameters: pa.Schema | None = None  # a query's parameters (protocol 1.7), when its connector gave them


def request_error(tenant_id: str, code: str, message: str) -> errors.CallError:
    """The error a client sees for a connector's error reply (docs/protocol.md §9)."""
    return errors.from_code(code, clip(message), f"connector of tenant {tenant_id}")


@dataclass
class Replay:
    """What a dataset's stream needs to resume on another link (docs/protocol.md §6a)."""

    dataset: str
    trace_id: str | None
    fingerprint: str | None = None  # from the connector's `resumable`; None: it cannot be replayed
    rows: int = 0  # rows received: a resumed stream starts after them
    schema: bytes | None = None  # the SCHEMA the client got: a resumed stream's must be the same
    cut_off: str | None = None  # resumed here after its tunnel ended for this reason, until its SCHEMA came again

    @property
    def ready(self) -> bool:
        return self.fingerprint is not None and self.schema is not None


@dataclass
class Parked:
    """A dataset's stream whose tunnel dropped, waiting for the tenant's connector to come back and replay it
    from the next row: its sink (the Flight call still reads it), its buffer reservation (kept meanwhile), and
    what the resumed do_get names."""

    tenant_id: str
    replay: Replay
    sink: StreamSink
    reserved: int
    reason: str  # why the old tunnel ended


@dataclass
class TenantLink:
    """One tenant's live connection: its endpoint, its waiting requests and its open streams."""

    tenant_id: str
    session_id: str
    datasets: list[str]
    transport: TunnelTransport
    budget: BufferBudget = field(default_factory=lambda: BufferBudget(0))
    connected_at: float = field(default_factory=time.time)
    last_heartbeat: float | None = None
    last_seen: float = field(default_factory=time.monotonic)
    closing_reason: str | None = None
    request_rate: TokenBucket | None = None
    connector_id: str = ""  # the register's connector_id (1.3); "" for older connectors
    epoch: int = 0  # the registration's fencing epoch (`--registry`; a local count without one)
    moving: bool = False  # told goaway to rebalance: calls prefer the tenant's other tunnels
    lease_until: float = float("inf")  # `--registry`: serve as owner only before this (monotonic) time
    _infos: dict[int, "asyncio.Future | concurrent.futures.Future"] = field(default_factory=dict)
    _sinks: dict[int, StreamSink] = field(default_factory=dict)
    _reserved: dict[int, int] = field(default_factory=dict)  # stream → bytes it holds of the budget: its window
    _data_calls: dict[int, object] = field(default_factory=dict)  # stream → its data call: cancel() ends it (Flight)
    _schemas: dict[bytes, pa.Schema] = field(default_factory=dict)  # flight_info schema message → schema
    _owed: dict[int, int] = field(default_factory=dict)  # stream → credit spent on this link, not yet granted back
    _replay: dict[int, Replay] = field(default_factory=dict)  # dataset stream → what resuming it needs (§6a)
    dropped_events: int = 0  # events for streams or requests the gateway had already closed

    @property
    def endpoint(self) -> GatewayEndpoint:
        return self.transport.endpoint

    @property
    def streams_in_flight(self) -> int:
        return len(self._sinks)

    @property
    def idle(self) -> bool:
        """No stream open and no answer awaited on this link."""
        return not self._sinks and not self._infos

    def handle(self, event: ev.Event) -> None:
        """Route one event of the core to the request or stream it belongs to; an event for a stream or
        request this side already closed (a cancel crossed it) is dropped and counted, never raised."""
        self.last_seen = time.monotonic()
        if isinstance(event, (ev.BatchReceived, ev.SchemaReceived)):
            sid = event.stream_id
            sink = self._sinks.get(sid)
            if sink is None:
                self.dropped_events += 1
            elif isinstance(event, ev.BatchReceived):
                self._owed[sid] = self._owed.get(sid, 0) + event.charge
                self.count_rows(sid, event.rows)
                sink.put(StreamItem.BATCH, (event.payload, event.charge))
            else:
                self._owed[sid] = self._owed.get(sid, 0) + len(event.payload)
                if self.take_schema(sid, event.payload):
                    sink.put(StreamItem.SCHEMA, event.payload)
        elif isinstance(event, ev.StreamResumable):
            replay = self._replay.get(event.stream_id)
            if replay is not None:
                replay.fingerprint = replay.fingerprint or event.fingerprint
                if replay.fingerprint != event.fingerprint:  # a resumed stream's connector serves other data
                    self._end_stream(event.stream_id, StreamItem.ERROR, errors.Unavailable(
                        f"dataset {replay.dataset!r} of tenant {self.tenant_id} changed while its stream was cut "
                        "off: it cannot resume; read it again"))
        elif isinstance(event, ev.StreamEnded):
            self._end_stream(event.stream_id, StreamItem.END)
        elif isinstance(event, ev.StreamRejected):
            self._end_stream(event.stream_id, StreamItem.ERROR, errors.Internal(
                f"connector of tenant {self.tenant_id} sent {clip(event.reason, 300)}"))
        elif isinstance(event, ev.FlightInfoReceived):
            future = self._infos.pop(event.request_id, None)
            if future is None or future.done():
                self.dropped_events += 1
                return
            try:
                future.set_result(FlightInfoReply(
                    self._schema(event.schema), event.rows, event.bytes,
                    None if event.parameters is None else self._schema(event.parameters)))
            except errors.CallError as exc:
                future.set_exception(exc)
        elif isinstance(event, ev.RequestFailed):
            error = request_error(self.tenant_id, event.code, event.message)
            replay = self._replay.get(event.request_id)
            if replay is not None and replay.cut_off is not None:  # a resume refused (its data changed): say what
                error = errors.Unavailable(                          # cut the stream off first
                    f"connector of tenant {self.tenant_id} disconnected: {replay.cut_off}; the stream could not "
                    f"resume: {clip(event.message, 300)}")
            future = self._infos.pop(event.request_id, None)
            if future is not None and not future.done():
                future.set_exception(error)
            else:
                self._end_stream(event.request_id, StreamItem.ERROR, error)
        elif isinstance(event, ev.HeartbeatReceived):
            self.last_heartbeat = time.time()

    def take_schema(self, sid: int, payload) -> bool:
        """A stream's SCHEMA arrived: True to hand it to the Flight side (kept too where the stream may resume:
        a resume must repeat it); False for a resumed stream's repeat, checked and dropped (the client has it;
        a different one ends the stream)."""
        replay = self._replay.get(sid)
        if replay is None:
            return True
        if replay.cut_off is None:
            replay.schema = bytes(payload)
            return True
        replay.cut_off = None
        if bytes(payload) != replay.schema:
            self._end_stream(sid, StreamItem.ERROR, errors.Unavailable(
                f"dataset {replay.dataset!r} of tenant {self.tenant_id} changed its schema while its stream was "
                "cut off: it cannot resume; read it again"))
        return False

    def count_rows(self, sid: int, rows: int) -> None:
        """Rows of a batch that arrived: a resumed stream starts after the last one."""
        replay = self._replay.get(sid)
        if replay is not None:
            replay.rows += rows

    def _schema(self, message: bytes) -> pa.Schema:
        """A flight_info's schema, read once per distinct message on this link (a connector answers with the
        same bytes every time): the Flight thread waiting for it then has nothing left to decode."""
        schema = self._schemas.get(message)
        if schema is None:
            schema = read_schema(message, self.tenant_id)
            if len(self._schemas) >= 256:
                self._schemas.clear()
            self._schemas[message] = schema
        return schema

    def _end_stream(self, stream_id: int, kind: str, value=None) -> None:
        """Take a stream out of the link, free its reservation and hand its last item to the Flight side."""
        sink = self._sinks.pop(stream_id, None)
        if sink is None:
            self.dropped_events += 1
            return
        self.budget.release(self.tenant_id, self._reserved.pop(stream_id, 0))
        self._forget(stream_id)
        if kind != StreamItem.CANCEL:
            sink.put(kind, value)
        sink.close()
        call = self._data_calls.pop(stream_id, None)
        if call is not None and kind != StreamItem.END:
            call.cancel()  # a data call still sending (or stalled) ends with the stream

    def _admit(self) -> None:
        """The per-link request rate (docs/protocol.md §7): refuse at once rather than queue."""
        if self.request_rate is not None and not self.request_rate.take(time.monotonic()):
            raise errors.Unavailable(
                f"tenant {self.tenant_id} is over its request rate of {self.request_rate.rate:g}/s; retry later")

    def _require_sql(self, params: list | None) -> None:
        if self.endpoint.sql is None:
            raise errors.Unsupported(
                f"the connector of tenant {self.tenant_id} does not support SQL (it speaks the tunnel protocol "
                "before 1.5, or was started without it); datasets can still be read whole")
        if params and len(params) > self.endpoint.max_params:
            raise errors.Unsupported(
                f"the connector of tenant {self.tenant_id} binds at most {self.endpoint.max_params} parameters to "
                f"a query, not {len(params)}" + (" (it speaks the tunnel protocol before 1.7)"
                                                  if not self.endpoint.max_params else ""))

    def ask_flight_info(self, dataset: str, trace_id: str | None, answer, sql: str | None = None,
                        params: list | None = None) -> int:
        """Send a get_flight_info — a query_info given `sql`, with `params` bound — now; its reply (or error)
        will be set on `answer`, an asyncio or a concurrent future. Returns the request id, for
        `forget_flight_info`."""
        if sql is not None:
            self._require_sql(params)
        self._admit()
        rid = self.endpoint.request_flight_info(dataset, trace_id, sql, params)
        self._infos[rid] = answer
        self.transport.flush_soon()
        return rid

    def forget_flight_info(self, request_id: int) -> None:
        """The asker stopped waiting: a late reply is dropped."""
        self._infos.pop(request_id, None)
        self.endpoint.forget_request(request_id)

    async def flight_info(self, dataset: str, timeout: float, trace_id: str | None = None,
                          sql: str | None = None) -> FlightInfoReply:
        """Ask the connector for a dataset's schema and size, or a query's schema."""
        future = asyncio.get_running_loop().create_future()
        rid = self.ask_flight_info(dataset, trace_id, future, sql)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise errors.TimedOut(f"connector of tenant {self.tenant_id} did not answer in {timeout:.0f} s") from None
        finally:
            self.forget_flight_info(rid)

    def open_stream(self, dataset: str, trace_id: str | None = None, sql: str | None = None,
                    params: list | None = None, resume=None) -> tuple[int, StreamSink]:
        """Send a do_get — a query given `sql`, with `params` bound; given `resume` (its `from_row` and
        `fingerprint`), a dataset's from a row, for another replica whose stream was cut off (§6a) — and
        return the stream id and the sink its frames arrive in."""
        if sql is not None:
            self._require_sql(params)
        if resume is not None and not self.endpoint.resumes:
            raise errors.Unavailable(f"the connector of tenant {self.tenant_id} on this replica does not resume "
                                     "streams (protocol 1.8, or --resume-window-s 0 here)")
        self._admit()
        window = self.endpoint.limits.initial_window
        self.budget.reserve(self.tenant_id, window)
        try:
            sid = self.endpoint.open_stream(
                dataset, trace_id, sql, params, *((resume.from_row, resume.fingerprint) if resume else ()))
        except LocalProtocolError as exc:  # the streams-in-flight limit (docs/protocol.md §7)
            self.budget.release(self.tenant_id, window)
            raise errors.Unavailable(f"tenant {self.tenant_id}: {exc}") from None
        self._reserved[sid] = window
        # a data call's sink holds one frame's worth while its Flight call sends the one before: enough to keep
        # the stream moving (HTTP/2 holds the rest at the connector), and a fraction of the window reserved
        sink = self._sinks[sid] = (FlowSink(min(window, self.endpoint.limits.max_frame_bytes)) if self.data_calls
                                   else StreamSink())
        sink.route = (self, sid)
        if sql is None and self.endpoint.resumes:
            self._replay[sid] = (Replay(dataset, trace_id, resume.fingerprint, resume.from_row) if resume
                                 else Replay(dataset, trace_id))
        self.transport.flush_soon()
        return sid, sink

    @property
    def data_calls(self) -> bool:
        """Whether each stream's data comes on its own call, with its own flow control (the Flight tunnel)."""
        return getattr(self.transport, "data_calls", False)

    def attach_data_call(self, stream_id: int, call) -> FlowSink | None:
        """A data call for one of this link's open streams (the Flight tunnel, docs/protocol.md §13): its sink, or
        None when the stream is not open here or already has its call. `call.cancel()` is called if the stream
        ends before the call does."""
        sink = self._sinks.get(stream_id)
        if not isinstance(sink, FlowSink) or stream_id in self._data_calls:
            return None
        self._data_calls[stream_id] = call
        return sink

    def data_call_ended(self, stream_id: int) -> None:
        """A data call ended with END after the messages it queued: the stream is complete."""
        self.last_seen = time.monotonic()
        if stream_id in self._sinks:
            self.endpoint.end_stream_elsewhere(stream_id)
            self._end_stream(stream_id, StreamItem.END)

    def data_call_cut(self, stream_id: int, why: str, park=None) -> None:
        """A data call ended without END while its stream is still open on this live link: its connection was cut
        (a proxy's idle or lifetime timeout, a reset) under a control call that goes on. A stream the connector
        can replay is handed to `park` as when a whole link ends, and continues from its next row (§6a), here at
        once; any other fails now, never short."""
        if stream_id not in self._sinks or self.closing_reason is not None or self.transport.closed is not None:
            return  # the stream ended (its error, a cancel) or the whole link did: decided there
        reason = f"its data call was cut ({clip(why, 200)})"
        replay = self._replay.get(stream_id)
        if park is not None and replay is not None and replay.ready:
            park(self._detach(stream_id, replay, reason))
        else:
            self._end_stream(stream_id, StreamItem.ERROR, errors.Unavailable(
                f"connector of tenant {self.tenant_id}: the stream's data call was cut ({clip(why, 200)}) and it "
                "cannot resume"))
        self.endpoint.cancel_stream(stream_id, reason)  # the connector stops serving it
        self.transport.flush_soon()

    def data_call_rejected(self, stream_id: int, reason: str) -> None:
        """A data call broke a rule of §4a or §13: that stream ends (its client gets the reason), the link goes on."""
        self._data_calls.pop(stream_id, None)  # the call that broke the rule ends itself, with the reason
        if stream_id in self._sinks:
            self.endpoint.cancel_stream(stream_id, reason)
            self.handle(ev.StreamRejected(stream_id, reason))
            self.transport.flush_soon()

    def grant(self, stream_id: int, size: int) -> None:
        """Credit back what the client consumed, widening the stream's window towards the link's measured
        bandwidth-delay product while the tenant's share of the buffer budget has room for it (docs/protocol.md
        §5b)."""
        size = min(size, self._owed.get(stream_id, 0))  # never more than it spent here (a resumed stream's
        if size <= 0:                                    # client also consumes what came before the drop)
            return
        self._owed[stream_id] -= size
        grow = self.endpoint.growth(stream_id)
        if grow and stream_id in self._reserved and self.budget.try_grow(self.tenant_id, grow):
            self._reserved[stream_id] += grow
        else:
            grow = 0
        self.endpoint.grant_credit(stream_id, size, grow)
        self.transport.flush_soon()

    def cancel(self, stream_id: int, reason: str) -> None:
        """The Flight side is done with a stream before its end: stop the connector; a no-op once it ended."""
        if stream_id in self._sinks:
            self._end_stream(stream_id, StreamItem.CANCEL)
            self.endpoint.cancel_stream(stream_id, reason)
            self.transport.flush_soon()

    def fail_all(self, reason: str, park=None) -> None:
        """The link is gone: every waiting request and open stream ends in an error, none looks complete —
        except, given `park`, the streams of datasets the connector said it can replay (docs/protocol.md §6a):
        each is handed to `park(Parked)` with its sink and reservation, to resume on the tenant's next link."""
        error = errors.Unavailable(f"connector of tenant {self.tenant_id} disconnected: {reason}")
        for future in self._infos.values():
            if not future.done():
                future.set_exception(error)
        for stream_id in list(self._sinks):
            replay = self._replay.get(stream_id)
            if park is not None and replay is not None and replay.ready:
                park(self._detach(stream_id, replay, reason))
            else:
                self._end_stream(stream_id, StreamItem.ERROR, error)
        self._infos.clear()
        self.endpoint.close()

    def _detach(self, stream_id: int, replay: Replay, reason: str) -> Parked:
        """Take a resumable stream off this link, its reservation kept."""
        sink = self._sinks.pop(stream_id)
        parked = Parked(self.tenant_id, replay, sink, self._reserved.pop(stream_id, 0), reason)
        self._forget(stream_id)
        call = self._data_calls.pop(stream_id, None)
        if call is not None:
            call.cancel()
        sink.route = None
        return parked

    def adopt(self, parked: Parked) -> bool:
        """Resume a parked stream here: a do_get from its next row, if this link can (it resumes streams, and
        its streams' sinks are of the parked one's kind); False if not."""
        if not self.endpoint.resumes or isinstance(parked.sink, FlowSink) != self.data_calls:
            return False
        replay = parked.replay
        try:
            sid = self.endpoint.open_stream(replay.dataset, replay.trace_id, from_row=replay.rows,
                                            fingerprint=replay.fingerprint)
        except LocalProtocolError:  # the streams-in-flight limit
            return False
        self._sinks[sid] = parked.sink
        self._reserved[sid] = parked.reserved
        replay.cut_off = parked.reason  # until its SCHEMA comes again
        self._replay[sid] = replay
        parked.sink.route = (self, sid)
        self.transport.flush_soon()
        return True

    def _forget(self, stream_id: int) -> None:
        self._owed.pop(stream_id, None)
        self._replay.pop(stream_id, None)

    def snapshot(self) -> dict:
        endpoint = getattr(self.transport, "endpoint", None)
        return {
            "status": "online",
            "session_id": self.session_id,
            "epoch": self.epoch,
            "connector_id": self.connector_id,
            "connected_at": self.connected_at,
            "last_heartbeat": self.last_heartbeat,
            "silent_s": round(time.monotonic() - self.last_seen, 3),
            "streams_in_flight": self.streams_in_flight,
            "rtt_ms": None if endpoint is None or endpoint.rtt_s is None else round(endpoint.rtt_s * 1000, 2),
            "window_target": None if endpoint is None else endpoint.window_target,
            "codec": None if endpoint is None else endpoint.codec,
            "dropped_events": self.dropped_events,
            "datasets": list(self.datasets),
        }
