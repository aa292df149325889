"""The seam between the protocol core and a real connection: one interface, one receive loop, one writer.

    TunnelTransport (typing.Protocol)   what the gateway and the connector use
    └── Link                            the shared loop: received messages into the core, events out,
        ├── WebSocketLink               queued messages out in order, close on a broken rule
        ├── PicowsLink
        ├── GrpcServerLink
        └── GrpcClientLink

Each adapter supplies `_receive()` (the messages of its connection), `_transmit()` (send what the core
queued), `_close_for()` (close with a code, reading the peer's reply) and `_ended()` (how the connection
ended). Errors of the lower library are mapped to `TunnelClosed` here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Endpoint, Event

log = logging.getLogger("poc.transports")


class TunnelTransport(Protocol):
    """One tunnel over one connection, whatever library carries it."""

    KIND: str  # "picows", "websockets" or "grpc": the transport label of metrics
    endpoint: Endpoint
    closed: TunnelClosed | None

    def events(self) -> AsyncIterator[list[Event]]:
        """The core's events for each received message; ends by raising TunnelClosed."""

    async def call(self, produce: Callable[..., Any], *args: Any) -> Any:
        """Run `produce` on the endpoint and send what it queued."""

    def flush_soon(self) -> None:
        """Schedule a flush if the endpoint queued something."""

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with a code and a reason (docs/protocol.md §8)."""


async def finish_even_if_cancelled(coro) -> None:
    """Run `coro` to its end even when the task awaiting it is cancelled, then let the cancel go on.

    Sending takes every message the core queued, whichever task queued it; a connector cancelling one
    stream's task (§6) in the middle must not drop the replies and credits of others with it. And grpc.aio
    cancels the whole call when a pending write is cancelled."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class Link:
    """The receive loop and the ordered writer every transport shares."""

    KIND = ""
    endpoint: Endpoint
    closed: TunnelClosed | None = None
    _closed_errors: tuple[type[BaseException], ...] = ()  # what a write raises once the connection is gone

    def _init_link(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.closed = None
        self._write_lock = asyncio.Lock()
        self._flush_scheduled = False

    # -- to be supplied by each adapter
    def _receive(self) -> AsyncIterator[str | bytes | bytearray | memoryview]:
        raise NotImplementedError

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        raise NotImplementedError

    async def _close_for(self, code: int, reason: str) -> None:
        """Close after a broken rule, reading what the peer still sends until its close reply."""
        await self.close(code, reason)

    def _ended(self) -> TunnelClosed:
        raise NotImplementedError

    # -- the shared loop
    async def events(self) -> AsyncIterator[list[Event]]:
        """Drive the core, then flush: each received message goes to the endpoint, its events are yielded,
        and what the caller queued while handling them is sent. A broken rule closes the link with its code."""
        try:
            async for message in self._receive():
                events = self._feed(message)
                if events:
                    yield events
                self.flush_soon()
        except RemoteProtocolError as exc:
            log.warning("closing link: %s", exc)
            self.closed = self.closed or TunnelClosed(exc.close_code, str(exc))
            await self._close_for(exc.close_code, str(exc))
            raise TunnelClosed(exc.close_code, str(exc)) from exc
        raise self._ended()

    def _feed(self, message: str | bytes | bytearray | memoryview) -> list[Event]:
        """One received message into the core: a str is a text frame, bytes a binary one."""
        now = time.monotonic()
        if isinstance(message, str):
            return self.endpoint.receive_text(message, now)
        return self.endpoint.receive_binary(message, now)

    # -- the ordered writer
    async def _send_queued(self) -> None:
        for item in self.endpoint.data_to_send():
            if self.closed is not None:
                return
            await self._transmit(item)

    async def call(self, produce: Callable[..., Any], *args: Any) -> Any:
        async with self._write_lock:
            result = produce(*args)
            await finish_even_if_cancelled(self._send_queued())
            return result

    def flush_soon(self) -> None:
        """Called after every received frame: most (data frames) queue nothing and create no task."""
        if not self._flush_scheduled and self.endpoint.has_data_to_send:
            self._flush_scheduled = True
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())  # held: not collected

    async def _flush_later(self) -> None:
        """Send what is queued; nothing cancels this task, so the send needs no shield (unlike `call`)."""
        self._flush_scheduled = False
        try:
            async with self._write_lock:
                await self._send_queued()
        except self._closed_errors:
            pass  # the reader sees the close and fails what was in flight
        except Exception as exc:  # a write that fails otherwise leaves the link unusable: close it
            log.warning("closing link: write failed: %s: %s", type(exc).__name__, exc)
            self.closed = self.closed or TunnelClosed(1011, "write failed")
            await self.close(1011, "write failed")

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        raise NotImplementedError
