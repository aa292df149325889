"""The gateway's end of a tunnel, sans-I/O: accepts a registration, asks for flight info, opens streams, grants
credit, and checks everything the connector sends (docs/protocol.md)."""

from __future__ import annotations

import base64

from . import ipc
from . import messages as m
from .endpoint import Endpoint, LinkState
from .errors import CloseCode, LocalProtocolError, RemoteProtocolError
from .events import (BatchReceived, Event, FlightInfoReceived, HeartbeatReceived, RegisterRequested, RequestFailed,
                     SchemaReceived, StreamEnded, StreamRejected, StreamResumable)
from .frames import DataFrame, FrameType
from .limits import Limits, TokenBucket
from .streams import Stream, StreamEvent


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
        self.max_params = 0  # 1.7: the most parameters the connector binds to one query (§3d)
        self.can_resume = False  # 1.8: the connector's register said it resumes streams (§6a)
        self.resumes = False  # … and this gateway's registered said it would ask it to
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
                self.max_params = message.max_params or 0
                self.can_resume = bool(message.resume)
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
        if isinstance(message, m.Resumable):
            if message.request_id in self.streams:
                return [StreamResumable(message.request_id, message.fingerprint)]
            if message.request_id >= self._next_id:
                raise RemoteProtocolError(f"resumable for stream {message.request_id} that the gateway never opened")
            self._count_unsolicited("resumable for a closed stream")
            return []
        if isinstance(message, m.FlightInfoReply):
            if not self._take_pending(message.request_id, message.ACTION):
                return []
            try:
                schema = base64.b64decode(message.schema, validate=True)
                parameters = (None if message.parameters is None
                              else base64.b64decode(message.parameters, validate=True))
            except ValueError:
                raise RemoteProtocolError("flight_info: schema is not valid base64") from None
            return [FlightInfoReceived(message.request_id, schema, message.rows, message.bytes, parameters)]
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
        return [BatchReceived(sid, frame.payload, info.charge, info.length)]

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
    def accept(self, session_id: str, heartbeat_s: float, resume: bool = False) -> None:
        """Answer the register with ok, a session id, the link's limits, the codec picked (§4b) and, given
        `resume` and a connector that can, that streams may be resumed (§6a)."""
        if self.state is not LinkState.AWAITING_REGISTER:
            raise LocalProtocolError(f"cannot accept a registration in state {self.state.name}")
        self.state = LinkState.REGISTERED
        lim = self.limits
        self.resumes = resume and self.can_resume
        self._send(m.Registered(session_id=session_id, heartbeat_s=heartbeat_s,
                                max_frame_bytes=lim.max_frame_bytes, window_bytes=lim.window_bytes,
                                max_streams=lim.max_streams, max_message_bytes=lim.max_message_bytes,
                                codec=self.codec, resume=True if self.resumes else None))

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

    def request_flight_info(self, dataset: str, trace_id: str | None = None, sql: str | None = None,
                            params: list | None = None) -> int:
        """Queue a get_flight_info — or, given `sql`, a query_info (1.5), with `params` bound (1.7) — and return
        its request id."""
        if sql is not None:
            self._require_sql(params)
        rid = self._new_id()
        self._pending_info.add(rid)
        self._send(m.GetFlightInfo(request_id=rid, dataset=dataset, trace_id=trace_id) if sql is None
                   else m.QueryInfo(request_id=rid, sql=sql, trace_id=trace_id, params=params or None))
        return rid

    def open_stream(self, dataset: str, trace_id: str | None = None, sql: str | None = None,
                    params: list | None = None, from_row: int | None = None, fingerprint: str | None = None) -> int:
        """Queue a do_get — or, given `sql`, a query (1.5), with `params` bound (1.7) — with a full window;
        return the stream id. `from_row` and `fingerprint` resume a dataset's stream (1.8, §6a)."""
        if from_row is not None and not self.resumes:
            raise LocalProtocolError("the connector was not asked to resume streams on this link (§6a)")
        if sql is not None:
            self._require_sql(params)
        if len(self.streams) >= self.limits.max_streams:
            raise LocalProtocolError(f"{len(self.streams)} streams already in flight (limit {self.limits.max_streams})")
        sid = self._new_id()
        window = self.limits.initial_window
        self.streams[sid] = Stream(sid, dataset, window)
        self._send(m.DoGet(request_id=sid, dataset=dataset, window=window, trace_id=trace_id, from_row=from_row,
                           fingerprint=fingerprint) if sql is None
                   else m.Query(request_id=sid, sql=sql, window=window, trace_id=trace_id, params=params or None))
        return sid

    def _require_sql(self, params: list | None = None) -> None:
        if self.sql is None:
            raise LocalProtocolError("the connector did not say it speaks SQL (its register has no `sql`)")
        if params and len(params) > self.max_params:
            raise LocalProtocolError(f"the connector binds at most {self.max_params} parameters to a query (its "
                                     f"register's `max_params`), not {len(params)}")

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

    def end_stream_elsewhere(self, stream_id: int) -> None:
        """A stream whose data travelled outside this link (a Flight tunnel's data call, §13, checked there) ended
        with END: it is no longer in flight."""
        self.streams.pop(stream_id, None)

    def forget_request(self, request_id: int) -> None:
        """Stop waiting for a flight_info reply (the caller gave up); a late reply is ignored."""
        self._pending_info.discard(request_id)

    @property
    def streams_in_flight(self) -> int:
        return len(self.streams)
