"""A stream's sink: how its frames go from the gateway's event loop to the Flight thread that serves the call,
on either kind of tunnel (credit messages, or each stream's own call with its own flow control)."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time

from .. import errors


class StreamItem:
    SCHEMA = "schema"
    BATCH = "batch"
    END = "end"
    ERROR = "error"
    CANCEL = "cancel"  # not queued: the Flight side went away


class StreamSink:
    """Hands one stream's frames from the event loop to the Flight thread that serves it.

    Unbounded as a queue, bounded in bytes by the stream's credit window (docs/protocol.md §5).
    """

    route: tuple | None = None  # (poc.gateway.link.TenantLink, stream id) that feeds it; None while parked
    held_until = 0.0  # monotonic: while a dropped stream waits to resume, `get` waits at least this long
    cancelled = False  # the Flight side left while the stream waited to resume

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, kind: str, value=None) -> None:
        self._queue.put((kind, value))

    def get(self, timeout: float, cancelled=lambda: False):
        """The next item; TimedOut after `timeout` (or once a resume's wait is over, `held_until`), Cancelled as
        soon as `cancelled()` (the Flight client left or its deadline passed), checked every `POLL_S`."""
        deadline = time.monotonic() + timeout
        while True:
            if cancelled():
                raise errors.Cancelled("the Flight client cancelled the call")
            left = max(deadline, self.held_until) - time.monotonic()
            if left <= 0:
                raise errors.TimedOut(f"no data from the connector for {timeout:.0f} s")
            try:
                return self._queue.get(timeout=min(left, self.POLL_S))
            except queue.Empty:
                pass

    POLL_S = 0.25

    def close(self) -> None:
        """The stream ended: nothing more will be taken from the connector."""


class FlowSink(StreamSink):
    """A stream's sink on a transport whose streams carry their own flow control (the Flight tunnel, docs/protocol.md
    §13): the data call, on the event loop, offers each message and waits while the sink holds `capacity` charged
    bytes (at most the stream's reserved window), reading nothing more from its call meanwhile, so the connector is
    held back by HTTP/2, not by credit messages; the Flight thread that serves the stream makes room as it takes
    them and wakes the waiting offer."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque = collections.deque()
        self._held = 0
        self._capacity = capacity
        self._closed = False
        self._ready = threading.Condition()
        self._room: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None  # an offer waiting for room

    def put(self, kind: str, value=None) -> None:
        with self._ready:
            self._items.append((kind, value, 0))
            self._ready.notify_all()

    async def offer(self, kind: str, value, charge: int) -> bool:
        """Queue a message once there is room for its charge (at once while the sink is empty); False, without
        queueing it, once the stream ended. On the event loop; one offer at a time."""
        while True:
            with self._ready:
                if self._closed:
                    return False
                if not self._held or self._held + charge <= self._capacity:
                    self._items.append((kind, value, charge))
                    self._held += charge
                    self._ready.notify_all()
                    return True
                loop = asyncio.get_running_loop()
                room = loop.create_future()
                self._room = (loop, room)
            await room

    def _wake_offer(self) -> None:
        """Under the lock: let a waiting offer look again (from the Flight thread, or the loop)."""
        if self._room is not None:
            loop, room = self._room
            self._room = None
            try:
                loop.call_soon_threadsafe(lambda: room.done() or room.set_result(None))
            except RuntimeError:
                pass  # the loop is closed: the gateway has stopped, nothing waits any more

    def get(self, timeout: float, cancelled=lambda: False):
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self._items:
                if cancelled():
                    raise errors.Cancelled("the Flight client cancelled the call")
                left = max(deadline, self.held_until) - time.monotonic()
                if left <= 0:
                    raise errors.TimedOut(f"no data from the connector for {timeout:.0f} s")
                self._ready.wait(min(left, self.POLL_S))
            kind, value, charge = self._items.popleft()
            self._held -= charge
            self._wake_offer()
            return kind, value

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
            self._wake_offer()
