"""What both ends of a tunnel share, sans-I/O: the link's state and its outbox (GatewayEndpoint and
ConnectorEndpoint are in modules of their own). Messages in, events out, messages to send queued.

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

import enum
from collections import deque

from . import messages as m
from .events import Event
from .errors import RemoteProtocolError
from .frames import HEADER, FrameType
from .streams import Stream


class LinkState(enum.Enum):
    AWAITING_REGISTER = "awaiting_register"
    REGISTERED = "registered"
    CLOSED = "closed"


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
