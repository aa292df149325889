"""What the gateway allows one connection (docs/protocol.md §7): the limits and their defaults — the one home of
each, read by the gateway's configuration, its command line and the docs — and a token bucket for rates (the
clock is passed in, so the core stays free of time)."""

from __future__ import annotations

from dataclasses import dataclass

from . import ipc

MAX_FRAME_BYTES = 4 * 1024 * 1024  # a binary frame's payload (--max-frame-bytes)
INITIAL_WINDOW_BYTES = 8 * 1024 * 1024  # a stream's credit at do_get (--initial-window-bytes)
MAX_WINDOW_BYTES = 64 * 1024 * 1024  # what adaptive windows may grow to (--window-bytes)
MAX_STREAMS = 256  # streams in flight per link (--max-streams)
MAX_MESSAGE_BYTES = 1024 * 1024  # a control message (--max-message-bytes)
UNSOLICITED_PER_S = 50.0  # heartbeats and messages for closed streams (--max-unsolicited-per-s)


@dataclass(frozen=True)
class Limits:
    """What the gateway allows one connection (§7); the defaults are the gateway's."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    window_bytes: int = MAX_WINDOW_BYTES
    max_streams: int = MAX_STREAMS
    max_message_bytes: int = MAX_MESSAGE_BYTES  # control messages
    unsolicited_per_s: float = UNSOLICITED_PER_S  # heartbeats and messages for closed streams: a flood closes 4005
    initial_window_bytes: int | None = None  # a stream's credit at do_get; None: INITIAL_WINDOW_BYTES, kept
    # between max_frame_bytes and window_bytes
    adaptive_window: bool = True  # grow streams' windows towards twice the link's measured BDP (§5b)
    codecs: tuple[str, ...] = ()  # IPC body codecs the gateway accepts, best first (§4b); () none

    def __post_init__(self) -> None:
        if self.window_bytes < self.max_frame_bytes:
            raise ValueError("window_bytes must be at least max_frame_bytes, or a full-size frame could never be sent")
        if self.initial_window_bytes is not None and \
                not self.max_frame_bytes <= self.initial_window_bytes <= self.window_bytes:
            raise ValueError("initial_window_bytes must lie between max_frame_bytes and window_bytes")
        if set(self.codecs) - set(ipc.CODECS):
            raise ValueError(f"codecs must be among {sorted(ipc.CODECS)}")

    @property
    def initial_window(self) -> int:
        if self.initial_window_bytes is not None:
            return self.initial_window_bytes
        return max(self.max_frame_bytes, min(INITIAL_WINDOW_BYTES, self.window_bytes))


class TokenBucket:
    """`rate` tokens a second, up to `burst`; `take(now)` says whether one more event fits."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
