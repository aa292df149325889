"""The two ends of a tunnel, sans-I/O: messages in, events out, messages to send queued.

A transport feeds every received WebSocket message to `receive_text` or
`receive_binary`, handles the events returned, then sends what `next_to_send()` gives, one message at a time,
until it gives None. Neither class touches a socket, a clock or a thread.

What is queued leaves in this order (docs/protocol.md §5a): every control message first, in the order queued,
whatever data waits; then data frames, taken from the streams that have some in deficit round-robin by
bytes, so concurrent streams share the link evenly however their batches are sized. Within one stream, frames
keep their order. A writer that asks for the next message only when the socket has room lets a control
message overtake every data frame still queued.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from dataclasses import dataclass

from . import ipc
from . import messages as m
from .errors import CloseCode, LocalProtocolError, RemoteProtocolError
from .frames import HEADER, DataFrame, FrameType
from .limits import TokenBucket
from .streams import Stream, StreamEvent


# ----------------------------------------------------------------------------- events

@dataclass(frozen=True)
class Event:
    """Something the peer did that the application must act on."""


@dataclass(frozen=True)
class RegisterRequested(Event):
    register: m.Register


@dataclass(frozen=True)
class Registered(Event):
    registered: m.Registered


@dataclass(frozen=True)
class RegistrationRefused(Event):
    code: str
    message: str


@dataclass(frozen=True)
class HeartbeatReceived(Event):
    ts: float


@dataclass(frozen=True)
class HeartbeatAcked(Event):
    ts: float


@dataclass(frozen=True)
class FlightInfoRequested(Event):
    request_id: int
    dataset: str
    trace_id: str | None = None
    sql: str | None = None  # 1.5 query_info: the schema of this query's result is asked, not a dataset's


@dataclass(frozen=True)
class FlightInfoReceived(Event):
    request_id: int
    schema: bytes
    rows: int
    bytes: int


@dataclass(frozen=True)
class StreamRequested(Event):
    stream_id: int
    dataset: str
    window: int
    trace_id: str | None = None
    sql: str | None = None  # 1.5 query: the stream carries this query's result, not a dataset


@dataclass(frozen=True)
class CreditGranted(Event):
    stream_id: int
    bytes: int


@dataclass(frozen=True)
class StreamCancelled(Event):
    stream_id: int
    reason: str


@dataclass(frozen=True)
class RequestFailed(Event):
    request_id: int
    code: str
    message: str


@dataclass(frozen=True)
class SchemaReceived(Event):
    stream_id: int
    payload: memoryview


@dataclass(frozen=True)
class BatchReceived(Event):
    stream_id: int
    payload: memoryview
    charge: int = 0  # the credit it cost: its size, or what it decompresses to as well (§4b)


@dataclass(frozen=True)
class RequestRefused(Event):
    """The gateway sent a request this end cannot take (§3c); an `error` for it is queued, the link goes on."""

    request_id: int
    reason: str


@dataclass(frozen=True)
class GoAwayReceived(Event):
    reason: str
    prefer: str | None = None


@dataclass(frozen=True)
class StreamEnded(Event):
    stream_id: int


@dataclass(frozen=True)
class StreamRejected(Event):
    """The connector sent a frame that is not an acceptable Arrow IPC message (§4a): the gateway cancelled
    the stream; its client must see an error."""

    stream_id: int
    reason: str


# ----------------------------------------------------------------------------- endpoints

class LinkState(enum.Enum):
    AWAITING_REGISTER = "awaiting_register"
    REGISTERED = "registered"
    CLOSED = "closed"


@dataclass(frozen=True)
class Limits:
    """What the gateway allows one connection (§7)."""

    max_frame_bytes: int = 8 * 1024 * 1024
    window_bytes: int = 16 * 1024 * 1024
    max_streams: int = 256
    max_message_bytes: int = 1024 * 1024  # control messages
    unsolicited_per_s: float = 50.0  # heartbeats and messages for closed streams: a flood is closed with 4005
    initial_window_bytes: int = 0  # a stream's credit at do_get; 0: window_bytes (then windows never grow)
    adaptive_window: bool = True  # grow streams' windows towards twice the link's measured BDP (§5b)
    codecs: tuple[str, ...] = ()  # IPC body codecs the gateway accepts, best first (§4b); () none

    def __post_init__(self) -> None:
        if self.window_bytes < self.max_frame_bytes:
            raise ValueError("window_bytes must be at least max_frame_bytes, or a full-size frame could never be sent")
        if self.initial_window_bytes and not self.max_frame_bytes <= self.initial_window_bytes <= self.window_bytes:
            raise ValueError("initial_window_bytes must lie between max_frame_bytes and window_bytes")
        if set(self.codecs) - set(ipc.CODECS):
            raise ValueError(f"codecs must be among {sorted(ipc.CODECS)}")

    @property
    def initial_window(self) -> int:
        return self.initial_window_bytes or self.window_bytes


QUANTUM = 256 * 1024  # bytes a stream's deficit grows by at each of its turns (deficit round-robin)


class Endpoint:
    """What both ends share: the outbox, the link state and the open streams."""

    def __init__(self) -> None:
        self._control: deque[str] = deque()  # control messages, in the order queued
        self._frames: dict[int, deque] = {}  # stream id → its data frames waiting: (type, payload, framed)
        self._turns: deque[int] = deque()  # streams with frames waiting, in round-robin order
        self._deficit: dict[int, int] = {}  # stream id → bytes it may still send in its turn
        self._head_served = False  # the stream at the head of _turns got its quantum for this turn
        self.control_queued = 0  # control messages queued since the link began
        self.control_sent = 0  # … and taken by next_to_send
        self.state = LinkState.AWAITING_REGISTER
        self.streams: dict[int, Stream] = {}
        self._now: float | None = None

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._control or self._turns)

    @property
    def has_control_to_send(self) -> bool:
        return bool(self._control)

    def next_to_send(self) -> str | bytes | bytearray | None:
        """The next message to write — str for a text frame, bytes for a binary one — or None when nothing
        waits. A data frame's header is written here, so a shared frame buffer must be handed to the socket
        before anything else runs (transports copy or send it in the same step)."""
        if self._control:
            self.control_sent += 1
            return self._control.popleft()
        while self._turns:
            sid = self._turns[0]
            if not self._head_served:
                self._deficit[sid] += QUANTUM
                self._head_served = True
            queue = self._frames[sid]
            frame_type, payload, framed = queue[0]
            size = len(framed) - HEADER.size if framed is not None else len(payload)
            if size <= self._deficit[sid]:
                self._deficit[sid] -= size
                queue.popleft()
                if not queue:
                    self._drop_frames(sid)
                if framed is None:
                    return HEADER.pack(frame_type, sid) + payload
                HEADER.pack_into(framed, 0, frame_type, sid)
                return framed
            self._turns.rotate(-1)  # its turn is over: the next stream's begins
            self._head_served = False
        return None

    def next_control_to_send(self) -> str | None:
        """The next control message only (a transport that can write at once sends these in the same step
        they were queued, without waiting for its writer)."""
        if not self._control:
            return None
        self.control_sent += 1
        return self._control.popleft()

    def data_to_send(self) -> list[str | bytes | bytearray]:
        """Everything queued, in the order `next_to_send` gives it (tests and simple transports)."""
        out = []
        while (item := self.next_to_send()) is not None:
            out.append(bytes(item) if isinstance(item, bytearray) else item)
        return out

    def _send(self, message: m.Message) -> None:
        self._queue_control(message.serialize())

    def _queue_control(self, text: str) -> None:
        self._control.append(text)
        self.control_queued += 1

    def _queue_frame(self, stream_id: int, frame_type: FrameType, payload, framed: bytearray | None) -> None:
        queue = self._frames.get(stream_id)
        if queue is None:
            queue = self._frames[stream_id] = deque()
            self._deficit[stream_id] = 0
            self._turns.append(stream_id)
        queue.append((frame_type, payload, framed))

    def _drop_frames(self, stream_id: int) -> None:
        """Forget a stream's frames not yet sent (it ended, failed or was cancelled)."""
        if self._frames.pop(stream_id, None) is None:
            return
        del self._deficit[stream_id]
        if self._turns[0] == stream_id:
            self._head_served = False
        self._turns.remove(stream_id)

    max_text_bytes = 1024 * 1024

    def receive_text(self, text: str, now: float | None = None) -> list[Event]:
        """Handle one text frame; raise RemoteProtocolError if the peer broke the contract.

        `now` (seconds, any monotonic clock) lets the gateway enforce its message-rate limit.
        """
        self._now = now
        if self.state is LinkState.CLOSED:
            return []
        if len(text) > self.max_text_bytes:
            raise RemoteProtocolError(f"control message of {len(text)} characters exceeds the limit of "
                                      f"{self.max_text_bytes}", close_code=1009)
        return self._handle(self._parse(text))

    def _parse(self, text: str) -> m.Message:
        return m.parse_message(text)

    def _handle(self, message: m.Message | None) -> list[Event]:
        raise NotImplementedError

    def close(self) -> list[int]:
        """Mark the link closed; return the ids of the streams that were still open."""
        self.state = LinkState.CLOSED
        open_ids = [sid for sid, s in self.streams.items() if not s.closed]
        self.streams.clear()
        self._frames.clear()
        self._deficit.clear()
        self._turns.clear()
        return open_ids

    def _unexpected(self, message: m.Message) -> RemoteProtocolError:
        return RemoteProtocolError(f"unexpected {message.ACTION!r} in state {self.state.name}")


class GatewayEndpoint(Endpoint):
    """The gateway's end: accepts a registration, asks for flight info, opens streams, grants credit."""

    def __init__(self, limits: Limits = Limits()) -> None:
        super().__init__()
        self.limits = limits
        self.max_text_bytes = limits.max_message_bytes
        self._unsolicited = TokenBucket(limits.unsolicited_per_s, 2 * limits.unsolicited_per_s)
        self._next_id = 1
        self._pending_info: set[int] = set()
        # Streams the gateway cancelled or rejected → credit the connector may still spend on them: frames
        # already on the wire when the cancel crossed them are discarded without counting (§6). Bounded.
        self._cancelled: dict[int, int] = {}
        self.codec: str | None = None  # the IPC body codec picked for this link (§4b)
        self.pings = False  # the connector speaks 1.4: it answers ping (§5b)
        self.sql: str | None = None  # 1.5: the SQL dialect the connector's register named; None: no SQL (§3b)
        # The link's bandwidth-delay product, measured with pings (§5b): bytes received while one ping is out.
        self._ping: tuple[int, float, int] | None = None  # (seq, sent at, bytes received when sent)
        self._ping_seq = 0
        self._last_ping = float("-inf")
        self.received_bytes = 0  # credit spent by the data frames received on this link (§4b charges)
        self.rtt_s: float | None = None  # the smallest round trip a ping measured
        self.delivery_bps = 0.0  # the highest delivery rate (bytes/s) a ping measured
        self.window_target = limits.initial_window  # what streams' windows grow to

    # -- input
    def _handle(self, message: m.Message) -> list[Event]:
        if self.state is LinkState.AWAITING_REGISTER:
            if isinstance(message, m.Register):
                self.pings = message.codecs is not None
                self.sql = message.sql
                self.codec = next((c for c in self.limits.codecs if c in (message.codecs or ())), None)
                return [RegisterRequested(message)]
            raise RemoteProtocolError(f"{message.ACTION!r} before register")
        if isinstance(message, m.Pong):
            self._measured(message.seq)
            return []
        if isinstance(message, m.Heartbeat):
            self._count_unsolicited("heartbeat")
            self._send(m.HeartbeatAck(ts=message.ts))
            return [HeartbeatReceived(message.ts)]
        if isinstance(message, m.FlightInfoReply):
            if not self._take_pending(message.request_id, message.ACTION):
                return []
            try:
                schema = base64.b64decode(message.schema, validate=True)
            except ValueError:
                raise RemoteProtocolError("flight_info: schema is not valid base64") from None
            return [FlightInfoReceived(message.request_id, schema, message.rows, message.bytes)]
        if isinstance(message, m.Error) and message.request_id is not None:
            rid = message.request_id
            if rid in self._pending_info:
                self._pending_info.discard(rid)
            elif rid in self.streams:
                self.streams.pop(rid).advance(StreamEvent.ERROR, RemoteProtocolError)
            elif self._cancelled.pop(rid, None) is not None:
                return []  # the connector failed a stream the gateway had already cancelled (§6)
            elif rid >= self._next_id:
                raise RemoteProtocolError(f"error for request {rid} that the gateway never sent")
            else:
                self._count_unsolicited("error for a closed request")
                return []  # a request the gateway already closed (§6)
            return [RequestFailed(rid, message.code, m.clip(message.message))]
        raise self._unexpected(message)

    def _take_pending(self, request_id: int, action: str) -> bool:
        """True for a reply the gateway waits for; False for a late one (dropped, counted as unsolicited)."""
        if request_id in self._pending_info:
            self._pending_info.discard(request_id)
            return True
        if request_id >= self._next_id:
            raise RemoteProtocolError(f"{action} for request {request_id} that the gateway did not send")
        self._count_unsolicited(f"{action} for a closed request")
        return False

    def _count_unsolicited(self, what: str) -> None:
        if self._now is not None and not self._unsolicited.take(self._now):
            raise RemoteProtocolError(f"too many unsolicited messages ({what}): over "
                                      f"{self.limits.unsolicited_per_s:.0f}/s", close_code=CloseCode.LIMIT_EXCEEDED)

    def receive_binary(self, data: bytes | bytearray | memoryview, now: float | None = None) -> list[Event]:
        """Handle one binary frame; its payload is passed on as a view, never copied."""
        self._now = now
        if self.state is LinkState.CLOSED:
            return []
        if self.state is not LinkState.REGISTERED:
            raise RemoteProtocolError("binary frame before register")
        frame = DataFrame.parse(data, self.limits.max_frame_bytes)
        sid = frame.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            if sid >= self._next_id:
                raise RemoteProtocolError(f"{frame.type.name} frame for stream {sid} that the gateway never opened")
            self._discard_late(sid, frame)
            return []
        if frame.type is FrameType.END:
            stream.advance(StreamEvent.END, RemoteProtocolError)
            del self.streams[sid]
            return [StreamEnded(sid)]
        schema = frame.type is FrameType.SCHEMA
        stream.advance(StreamEvent.SCHEMA if schema else StreamEvent.BATCH, RemoteProtocolError)
        self._maybe_ping()
        try:
            info = ipc.check_message(frame.payload, ipc.SCHEMA if schema else ipc.RECORD_BATCH, self.codec)
        except ipc.InvalidMessage as exc:  # the stream fails, the link goes on (§4a)
            self.received_bytes += len(frame.payload)
            stream.spend(len(frame.payload), remote=True)
            reason = f"invalid Arrow IPC in a {frame.type.name} frame: {exc}"
            self.cancel_stream(sid, reason)
            return [StreamRejected(sid, reason)]
        self.received_bytes += info.charge  # in credit's units, which windows are counted in
        stream.spend(info.charge, remote=True)
        if info.charge > self.limits.max_frame_bytes:  # a compressed batch that decodes past a frame (§4b)
            reason = f"a BATCH frame that decodes to {info.charge} bytes, over max_frame_bytes"
            self.cancel_stream(sid, reason)
            return [StreamRejected(sid, reason)]
        if schema:
            return [SchemaReceived(sid, frame.payload)]
        return [BatchReceived(sid, frame.payload, info.charge)]

    # -- the link's bandwidth-delay product (§5b)
    PING_INTERVAL_S = 0.05  # at most one ping this often, and one at a time

    def _maybe_ping(self) -> None:
        """While data arrives, keep one ping out: the bytes received before its pong are one round trip's."""
        now = self._now
        if (not self.pings or self._ping is not None or now is None or not self.limits.adaptive_window
                or now - self._last_ping < self.PING_INTERVAL_S):
            return
        self._ping_seq += 1
        self._ping = (self._ping_seq, now, self.received_bytes)
        self._last_ping = now
        self._send(m.Ping(seq=self._ping_seq))

    def _measured(self, seq: int) -> None:
        """A pong: one round trip and the bytes received during it. As gRPC's BDP probe does, the windows'
        target doubles past what one round trip carried only when the open streams' windows were nearly all
        in flight (the windows, not the link, were the bound) and the delivery rate did not fall: queueing
        delay alone, which lengthens the round trip without raising the rate, never widens them."""
        if self._ping is None or seq != self._ping[0] or self._now is None:
            self._count_unsolicited("pong without its ping")
            return
        _, sent_at, received = self._ping
        self._ping = None
        rtt = max(self._now - sent_at, 1e-4)
        sample = self.received_bytes - received
        rate = sample / rtt
        self.rtt_s = rtt if self.rtt_s is None else min(self.rtt_s, rtt)
        open_windows = sum(s.window for s in self.streams.values())
        if self.streams and 3 * sample >= 2 * open_windows and rate >= self.delivery_bps:
            lim = self.limits
            per_stream = 2 * sample // len(self.streams)
            self.window_target = int(min(lim.window_bytes, max(self.window_target, per_stream)))
        self.delivery_bps = max(self.delivery_bps, rate)

    def growth(self, stream_id: int) -> int:
        """Bytes by which a stream's window may grow now: up to the target, never past window_bytes."""
        stream = self.streams.get(stream_id)
        if stream is None or not self.limits.adaptive_window:
            return 0
        return max(0, min(self.window_target, self.limits.window_bytes) - stream.window)

    def _discard_late(self, stream_id: int, frame: DataFrame) -> None:
        """A frame of a stream the gateway closed: free within the credit the stream had left (§6),
        counted as unsolicited beyond it."""
        left = self._cancelled.get(stream_id)
        if left is not None and frame.type is FrameType.END:
            del self._cancelled[stream_id]
        elif left is not None and len(frame.payload) <= left:
            self._cancelled[stream_id] = left - len(frame.payload)
        else:
            self._count_unsolicited("frame for a closed stream")

    # -- output
    def accept(self, session_id: str, heartbeat_s: float) -> None:
        """Answer the register with ok, a session id, the link's limits and the codec picked (§4b)."""
        if self.state is not LinkState.AWAITING_REGISTER:
            raise LocalProtocolError(f"cannot accept a registration in state {self.state.name}")
        self.state = LinkState.REGISTERED
        lim = self.limits
        self._send(m.Registered(session_id=session_id, heartbeat_s=heartbeat_s,
                                max_frame_bytes=lim.max_frame_bytes, window_bytes=lim.window_bytes,
                                max_streams=lim.max_streams, max_message_bytes=lim.max_message_bytes,
                                codec=self.codec))

    def refuse(self, code: str, message: str) -> None:
        """Answer the register with an error; the transport then closes the socket (4001)."""
        self._send(m.Error(code=code, message=message))
        self.state = LinkState.CLOSED

    def goaway(self, reason: str, prefer: str | None = None) -> None:
        """Queue a goaway (1.3): the connector should open a tunnel to another gateway before this link closes.
        Only for links whose register carried a connector_id; a no-op on a link that is not registered."""
        if self.state is LinkState.REGISTERED:
            self._send(m.GoAway(reason=reason, prefer=prefer))

    def _new_id(self) -> int:
        if self.state is not LinkState.REGISTERED:
            raise LocalProtocolError(f"cannot send a request in state {self.state.name}")
        rid = self._next_id
        self._next_id += 1
        return rid

    def request_flight_info(self, dataset: str, trace_id: str | None = None, sql: str | None = None) -> int:
        """Queue a get_flight_info — or, given `sql`, a query_info (1.5) — and return its request id."""
        if sql is not None:
            self._require_sql()
        rid = self._new_id()
        self._pending_info.add(rid)
        self._send(m.GetFlightInfo(request_id=rid, dataset=dataset, trace_id=trace_id) if sql is None
                   else m.QueryInfo(request_id=rid, sql=sql, trace_id=trace_id))
        return rid

    def open_stream(self, dataset: str, trace_id: str | None = None, sql: str | None = None) -> int:
        """Queue a do_get — or, given `sql`, a query (1.5) — with a full window; return the stream id."""
        if sql is not None:
            self._require_sql()
        if len(self.streams) >= self.limits.max_streams:
            raise LocalProtocolError(f"{len(self.streams)} streams already in flight (limit {self.limits.max_streams})")
        sid = self._new_id()
        window = self.limits.initial_window
        self.streams[sid] = Stream(sid, dataset, window)
        self._send(m.DoGet(request_id=sid, dataset=dataset, window=window, trace_id=trace_id) if sql is None
                   else m.Query(request_id=sid, sql=sql, window=window, trace_id=trace_id))
        return sid

    def _require_sql(self) -> None:
        if self.sql is None:
            raise LocalProtocolError("the connector did not say it speaks SQL (its register has no `sql`)")

    @property
    def grant_threshold(self) -> int:
        """Consumed bytes after which credit is granted back (§5.4): a quarter of the initial window, sooner
        when the window is small, so that a caught-up stream always has credit for a frame of max_frame_bytes."""
        lim = self.limits
        return max(1, min(lim.initial_window // 4, lim.initial_window - lim.max_frame_bytes))

    def grant_credit(self, stream_id: int, size: int, grow: int = 0) -> None:
        """Let the connector send `size` more bytes on a stream, and `grow` more on top that widen its window
        (at most `growth()`); a no-op once it closed."""
        stream = self.streams.get(stream_id)
        if stream is None or size + grow <= 0:
            return
        grow = max(0, min(grow, self.growth(stream_id)))
        stream.window += grow
        stream.grant(size + grow)
        self._send(m.Credit(request_id=stream_id, bytes=size + grow))

    def cancel_stream(self, stream_id: int, reason: str) -> None:
        """Tell the connector to stop a stream; frames already on the wire are discarded."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.advance(StreamEvent.CANCEL)
            self._cancelled[stream_id] = stream.credit
            if len(self._cancelled) > self.limits.max_streams:
                del self._cancelled[next(iter(self._cancelled))]  # oldest first: the bound of §6
            self._send(m.Cancel(request_id=stream_id, reason=m.clip(reason)))

    def forget_request(self, request_id: int) -> None:
        """Stop waiting for a flight_info reply (the caller gave up); a late reply is ignored."""
        self._pending_info.discard(request_id)

    @property
    def streams_in_flight(self) -> int:
        return len(self.streams)


class ConnectorEndpoint(Endpoint):
    """The connector's end: registers, answers requests, streams frames within its credit."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: m.Registered | None = None
        self._register_sent = False
        self._codecs: list[str] | None = None

    def register(self, tenant_id: str, token: str, datasets: list[str], connector_id: str | None = None,
                 codecs: list[str] | None = None, sql: str | None = None) -> None:
        """Queue the register message: the first message on every link (§2). `codecs` (1.4, [] for none) are
        the IPC body codecs this end can send; giving them also says it answers ping. `sql` (1.5): the dialect
        of the queries it answers (query_info, query)."""
        if self._register_sent:
            raise LocalProtocolError("register was already sent on this link")
        self._register_sent = True
        self._codecs = codecs
        self._send(m.Register(tenant_id=tenant_id, token=token, version=m.PROTOCOL_VERSION, datasets=datasets,
                              connector_id=connector_id, codecs=codecs, sql=sql))

    @property
    def codec(self) -> str | None:
        """The codec the gateway picked for this link, if any (§4b)."""
        return self.registered.codec if self.registered is not None else None

    def receive_binary(self, data: bytes | bytearray | memoryview, now: float | None = None) -> list[Event]:
        raise RemoteProtocolError("the gateway must not send binary frames")

    def _parse(self, text: str) -> m.Message | RequestRefused:
        """A message; or, for a request that breaks §3 but whose request id can be read and names no open
        stream, its refusal: an `error` for that request alone is queued (§3c)."""
        try:
            return m.parse_message(text)
        except RemoteProtocolError as exc:
            rid = m.request_id_of(text)
            if self.state is not LinkState.REGISTERED or rid is None or rid in self.streams:
                raise
            self._refuse(rid, str(exc))
            return RequestRefused(rid, str(exc))

    def _refuse(self, request_id: int, reason: str) -> None:
        self._send(m.Error(code="invalid_request", request_id=request_id,
                           message=m.clip(f"the connector cannot take this request: {reason}", 300)))

    def _handle(self, message: m.Message | RequestRefused) -> list[Event]:
        if isinstance(message, RequestRefused):
            return [message]
        if self.state is LinkState.AWAITING_REGISTER:
            if isinstance(message, m.Registered):
                if not (message.heartbeat_s > 0 and 0 < message.max_frame_bytes <= message.window_bytes
                        and message.max_streams > 0 and message.max_message_bytes > 0):
                    raise RemoteProtocolError(f"registered announces impossible limits: {message}")
                if message.codec is not None and message.codec not in (self._codecs or ()):
                    raise RemoteProtocolError(f"registered picks codec {message.codec!r}, which was not offered")
                self.state = LinkState.REGISTERED
                self.registered = message
                return [Registered(message)]
            if isinstance(message, m.Error):
                self.state = LinkState.CLOSED
                return [RegistrationRefused(message.code, message.message)]
            raise RemoteProtocolError(f"{message.ACTION!r} before the registration was answered")
        if isinstance(message, m.GetFlightInfo):
            return [FlightInfoRequested(message.request_id, message.dataset, message.trace_id)]
        if isinstance(message, m.QueryInfo):
            return [FlightInfoRequested(message.request_id, "", message.trace_id, message.sql)]
        if isinstance(message, (m.DoGet, m.Query)):
            if message.request_id in self.streams:
                raise RemoteProtocolError(f"{message.ACTION} reuses the id {message.request_id} of an open stream")
            if message.window < self.registered.max_frame_bytes:
                reason = f"{message.ACTION} window {message.window} is below max_frame_bytes"
                self._refuse(message.request_id, reason)
                return [RequestRefused(message.request_id, reason)]
            sql = message.sql if isinstance(message, m.Query) else None
            dataset = "" if sql is not None else message.dataset
            self.streams[message.request_id] = Stream(message.request_id, dataset, message.window)
            return [StreamRequested(message.request_id, dataset, message.window, message.trace_id, sql)]
        if isinstance(message, m.Credit):
            stream = self.streams.get(message.request_id)
            if stream is None:
                return []  # the stream ended while the grant was on the wire
            stream.grant(message.bytes)
            return [CreditGranted(message.request_id, message.bytes)]
        if isinstance(message, m.Cancel):
            self._drop_frames(message.request_id)  # queued frames of a cancelled stream are never sent (§6)
            stream = self.streams.pop(message.request_id, None)
            if stream is None:
                return []
            stream.advance(StreamEvent.CANCEL, RemoteProtocolError)
            return [StreamCancelled(message.request_id, message.reason)]
        if isinstance(message, m.HeartbeatAck):
            return [HeartbeatAcked(message.ts)]
        if isinstance(message, m.Ping):
            self._send(m.Pong(seq=message.seq))  # a control message: it overtakes queued data
            return []
        if isinstance(message, m.GoAway):
            return [GoAwayReceived(message.reason, message.prefer)]
        if isinstance(message, m.Error):
            return [RequestFailed(message.request_id or 0, message.code, message.message)]
        raise self._unexpected(message)

    # -- output
    def _require_registered(self) -> None:
        if self.state is not LinkState.REGISTERED:
            raise LocalProtocolError(f"cannot send in state {self.state.name}")

    def heartbeat(self, ts: float) -> None:
        self._require_registered()
        self._send(m.Heartbeat(ts=ts))

    def reply_flight_info(self, request_id: int, schema: bytes, rows: int, size: int) -> None:
        """Answer a get_flight_info; a schema too large for the gateway's message limit (§2) is answered with
        an `invalid_request` error instead, which the gateway can take."""
        self._require_registered()
        reply = m.FlightInfoReply(request_id=request_id, schema=base64.b64encode(schema).decode("ascii"),
                                  rows=rows, bytes=size).serialize()
        limit = self.registered.max_message_bytes
        if len(reply.encode()) > limit:
            self._send(m.Error(code="invalid_request", request_id=request_id,
                               message=f"the dataset's schema needs a {len(reply)}-byte flight_info, over the "
                                       f"gateway's message limit of {limit} bytes"))
            return
        self._queue_control(reply)

    def fail_request(self, request_id: int, code: str, message: str) -> None:
        """Answer a request or end a stream with an error (§3.9). The error is a control message, so it
        overtakes the stream's frames still queued: those are dropped, never sent after it."""
        self._require_registered()
        self._drop_frames(request_id)
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.advance(StreamEvent.ERROR)
        self._send(m.Error(code=code, message=message, request_id=request_id))

    def credit(self, stream_id: int) -> int:
        """Bytes the stream may still send; -1 once it is closed or cancelled."""
        stream = self.streams.get(stream_id)
        return -1 if stream is None else stream.credit

    def send_frame(self, frame_type: FrameType, stream_id: int, payload: bytes | memoryview = b"", *,
                   framed: bytearray | None = None, charge: int | None = None) -> None:
        """Queue a data frame; raise LocalProtocolError if the stream's state or credit forbids it. Credit is
        spent now; the frame leaves in its stream's turn (module docstring).

        `framed` avoids a copy: a buffer whose first 8 bytes are free for the header and whose rest is the
        payload. It is queued as it is — it may be queued by several streams at once, since the header is
        written as it leaves — so the caller must not change its payload. `charge`: the credit a compressed
        batch costs (`ipc.charge`, §4b); by default the payload's size.
        """
        self._require_registered()
        stream = self.streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        size = len(framed) - HEADER.size if framed is not None else len(payload)
        max_frame = self.registered.max_frame_bytes
        if size > max_frame:
            raise LocalProtocolError(f"payload of {size} bytes exceeds max_frame_bytes {max_frame}")
        stream.advance(_FRAME_EVENTS[frame_type])
        stream.spend(size if charge is None else charge, remote=False)
        if stream.closed:
            del self.streams[stream_id]
        self._queue_frame(stream_id, frame_type, payload, framed)


_FRAME_EVENTS = {FrameType.SCHEMA: StreamEvent.SCHEMA, FrameType.BATCH: StreamEvent.BATCH,
                 FrameType.END: StreamEvent.END}
