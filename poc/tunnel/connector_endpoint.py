"""The connector's end of a tunnel, sans-I/O: registers, answers requests, streams frames within its credit
(docs/protocol.md)."""

from __future__ import annotations

import base64

from . import messages as m
from .endpoint import Endpoint, LinkState
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (CreditGranted, Event, FlightInfoRequested, GoAwayReceived, HeartbeatAcked, Registered,
                     RegistrationRefused, RequestFailed, RequestRefused, StreamCancelled, StreamRequested)
from .frames import HEADER, FrameType
from .streams import Stream, StreamEvent


class ConnectorEndpoint(Endpoint):
    """The connector's end: registers, answers requests, streams frames within its credit."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: m.Registered | None = None
        self._register_sent = False
        self._codecs: list[str] | None = None

    def register(self, tenant_id: str, token: str, datasets: list[str], connector_id: str | None = None,
                 codecs: list[str] | None = None, sql: str | None = None, max_params: int | None = None,
                 resume: bool = False) -> None:
        """Queue the register message: the first message on every link (§2). `codecs` (1.4, [] for none) are
        the IPC body codecs this end can send; giving them also says it answers ping. `sql` (1.5): the dialect
        of the queries it answers (query_info, query); `max_params` (1.7): the most values it binds to one;
        `resume` (1.8): it can replay a dataset's stream from a row (§6a)."""
        if self._register_sent:
            raise LocalProtocolError("register was already sent on this link")
        self._register_sent = True
        self._codecs = codecs
        self._send(m.Register(tenant_id=tenant_id, token=token, version=m.PROTOCOL_VERSION, datasets=datasets,
                              connector_id=connector_id, codecs=codecs, sql=sql, max_params=max_params,
                              resume=True if resume else None))

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
            return [FlightInfoRequested(message.request_id, "", message.trace_id, message.sql, message.params)]
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
            if isinstance(message, m.Query):
                return [StreamRequested(message.request_id, dataset, message.window, message.trace_id, sql,
                                        message.params)]
            return [StreamRequested(message.request_id, dataset, message.window, message.trace_id,
                                    from_row=message.from_row, fingerprint=message.fingerprint)]
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

    def reply_flight_info(self, request_id: int, schema: bytes, rows: int, size: int,
                          parameters: bytes | None = None) -> None:
        """Answer a get_flight_info (or a query_info, with its `parameters`' schema, 1.7); a schema too large for
        the gateway's message limit (§2) is answered with an `invalid_request` error instead, which the gateway
        can take."""
        self._require_registered()
        reply = m.FlightInfoReply(request_id=request_id, schema=base64.b64encode(schema).decode("ascii"),
                                  rows=rows, bytes=size, parameters=None if parameters is None else
                                  base64.b64encode(parameters).decode("ascii")).serialize()
        limit = self.registered.max_message_bytes
        if len(reply.encode()) > limit:
            self._send(m.Error(code="invalid_request", request_id=request_id,
                               message=f"the dataset's schema needs a {len(reply)}-byte flight_info, over the "
                                       f"gateway's message limit of {limit} bytes"))
            return
        self._queue_control(reply)

    @property
    def resumes(self) -> bool:
        """Whether the gateway asked for replayable streams to be named (`registered.resume`, 1.8, §6a)."""
        return bool(self.registered is not None and self.registered.resume)

    def resumable(self, stream_id: int, fingerprint: str) -> None:
        """Say, before its SCHEMA, that a stream's dataset can be replayed from any row while `fingerprint`
        holds (§6a); a control message, so it leaves ahead of the stream's frames."""
        self._require_registered()
        if self.resumes and stream_id in self.streams:
            self._send(m.Resumable(request_id=stream_id, fingerprint=fingerprint))

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

    def end_stream_elsewhere(self, stream_id: int) -> None:
        """A stream whose data went on its own call (a Flight tunnel's data call, §13) was sent to its END."""
        self.streams.pop(stream_id, None)

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
