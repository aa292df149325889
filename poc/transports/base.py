"""The seam between the protocol core and a real connection: one interface, one receive loop, one writer.

    TunnelTransport (typing.Protocol)   what the gateway and the connector use
    └── Link                            the shared loop: received messages into the core, events out,
        ├── WebSocketLink               control before data, streams in turn; close on a broken rule
        ├── PicowsLink
        ├── FlightServerLink            control call only: each stream's data has a call of its own
        └── FlightClientLink

Each adapter supplies `_receive()` (the messages of its connection), `_transmit()` (send one message the
core gave; it must take the bytes — copy them or hand them to the socket — before it first waits, since a
frame buffer may be shared by several streams and its header is rewritten for the next), `_close_for()` (close with a code, reading the peer's reply) and `_ended()` (how the connection
ended). Errors of the lower library are mapped to `TunnelClosed` here, once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Endpoint
from ..tunnel.events import Event

log = logging.getLogger("poc.transports")


UNSENT_LOWAT = 128 * 1024  # bytes the kernel may hold unsent on a sending socket (TCP_NOTSENT_LOWAT), at least
MAX_UNSENT_LOWAT = 3 * 1024 * 1024  # … and at most, once the link's rate is known: above a default frame (2 MiB)
UNSENT_BUDGET_S = 0.02  # what the link drains in this long: a control message waits for no more behind data


def unsent_budget(drain_bps: float | None) -> int:
    """The unsent bytes a connector's socket may hold: what the link drains in UNSENT_BUDGET_S (as frames are
    cut, docs/protocol.md §5a), from UNSENT_LOWAT (also while the rate is unknown) to MAX_UNSENT_LOWAT. A
    fast link then sends in large pieces (a 128 KiB bound cost the connector a wake-up per 128 KiB: 2.8 × the
    direct server's CPU per GB; a 1 MiB one had picows copy the part of each 2 MiB frame the kernel did not
    take: 2.0-2.2 × against 1.7-1.8 × at 3 MiB, docs/results.md); a slow one still lets a control message
    overtake its data."""
    if drain_bps is None:
        return UNSENT_LOWAT
    return int(min(max(drain_bps * UNSENT_BUDGET_S, UNSENT_LOWAT), MAX_UNSENT_LOWAT))


def keep_unsent_small(sock: socket.socket | None, size: int) -> None:
    """Let the socket report room only while it holds less than `size` bytes not yet sent, instead of a
    whole autotuned send buffer (megabytes): data then waits in the endpoint's queue, where a control message
    can overtake it, rather than in the kernel, where it cannot. Linux only; elsewhere a no-op."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, size)
    except OSError:
        pass


NEAR_RTT_US = 1000  # a TCP round trip under this: a link within one site, whose receive queue can be short


def tcp_min_rtt_us(sock: socket.socket | None) -> int | None:
    """The lowest round-trip time the kernel has seen on a TCP socket, in microseconds (TCP_INFO's
    tcpi_min_rtt, or its smoothed tcpi_rtt on kernels without it); None where it cannot say."""
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 152)
    except OSError:
        return None
    if len(info) >= 152:
        return int.from_bytes(info[148:152], "little")
    return int.from_bytes(info[68:72], "little") if len(info) >= 72 else None


def bound_receive_queue(sock: socket.socket | None, size: int, min_rtt_us=tcp_min_rtt_us) -> bool:
    """On a tunnel socket whose round trip is under NEAR_RTT_US, hold the kernel's receive buffer to `size`
    (SO_RCVBUF; Linux doubles it for its bookkeeping and caps it at net.core.rmem_max) instead of letting
    autotuning grow it to tens of megabytes. A control message the connector sends then waits behind at
    most that much data in this side's kernel, and the rest of the data waits at the connector, where control
    messages overtake it (docs/results.md: GetFlightInfo under load). A link with a longer round trip keeps
    the kernel's autotuning, which it needs to fill the path. `size` 0 leaves every socket alone. True if the
    bound was set."""
    if not size or sock is None:
        return False
    rtt = min_rtt_us(sock)
    if rtt is None or rtt >= NEAR_RTT_US:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        return False
    return True


class TunnelTransport(Protocol):
    """One tunnel over one connection, whatever library carries it."""

    KIND: str  # "picows", "websockets" or "flight": the transport label of metrics
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

    def socket(self) -> socket.socket | None:
        """The TCP socket under the link, where the transport exposes one."""


class Link:
    """The receive loop and the writer every transport shares."""

    KIND = ""
    endpoint: Endpoint
    closed: TunnelClosed | None = None
    _closed_errors: tuple[type[BaseException], ...] = ()  # what a write raises once the connection is gone

    def _init_link(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.closed = None
        self._writer: asyncio.Task | None = None  # runs while the endpoint has something queued
        self._progress: asyncio.Future | None = None  # set when the writer sent a control message, or stopped
        self.drain_bps: float | None = None  # how fast this link took data while more waited (bytes/s)
        self.unsent_bound: int | None = None  # a connector's: the socket's TCP_NOTSENT_LOWAT (bound_unsent)
        self._busy = [0, 0.0]  # bytes and seconds of writing with more waiting, since the last estimate

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

    # -- the writer
    async def call(self, produce: Callable[..., Any], *args: Any) -> Any:
        """Run `produce` on the endpoint, then wait until the control messages queued so far have been written
        (data frames go in their turn; a caller cancelled meanwhile stops waiting, nothing is lost)."""
        result = produce(*args)
        target = self.endpoint.control_queued
        self.flush_soon()
        while self.endpoint.control_sent < target and self._writer is not None:
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._progress)
        return result

    def flush_soon(self) -> None:
        """Send what is queued: control messages at once where the transport can write without waiting
        (`_send_now`), the rest by the writer, started if it is not running. Called after every received
        frame (most queue nothing and create no task) and after the application queued something."""
        if self.closed is not None or not self.endpoint.has_data_to_send:
            return
        if self._send_control_now() and not self.endpoint.has_data_to_send:
            return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())  # held: not collected

    def _send_control_now(self) -> bool:
        """Write every queued control message in this step if the transport can (`_send_now`); True if it
        did. A control message then leaves without waiting a turn of the event loop, which under load is
        most of its delay (docs/results.md)."""
        endpoint = self.endpoint
        sent = False
        while endpoint.has_control_to_send and self._can_send_now():
            self._send_now(endpoint.next_control_to_send())
            sent = True
        if sent:
            self._tell_progress()
        return sent

    def _can_send_now(self) -> bool:
        """Whether `_send_now` may write a message in this step (transports that cannot: never)."""
        return False

    def _send_now(self, text: str) -> None:
        raise NotImplementedError

    async def _write(self) -> None:
        """Send the endpoint's messages one at a time in its order (control first, then data frames in
        round-robin), asking for the next only once the transport has room, so that a control message queued
        meanwhile goes before every data frame still waiting. Ends when nothing is queued; nothing cancels it."""
        endpoint = self.endpoint
        try:
            while self.closed is None:
                sent_control = endpoint.control_sent
                item = endpoint.next_to_send()
                if item is None:
                    break
                started = time.monotonic()
                await self._transmit(item)  # takes the bytes before it first waits (next_to_send's contract)
                if endpoint.control_sent != sent_control:
                    self._tell_progress()
                elif endpoint.has_data_to_send:
                    self._measure_drain(len(item), time.monotonic() - started)
        except self._closed_errors:
            pass  # the reader sees the close and fails what was in flight
        except Exception as exc:  # a write that fails otherwise leaves the link unusable: close it
            log.warning("closing link: write failed: %s: %s", type(exc).__name__, exc)
            self.closed = self.closed or TunnelClosed(1011, "write failed")
            await self.close(1011, "write failed")
        finally:
            self._writer = None
            self._tell_progress()

    def _measure_drain(self, size: int, seconds: float) -> None:
        """Bytes written per second while data waited behind them (the link, not the application, was the
        bound), over spans of at least half a second, the newest span weighing half."""
        busy = self._busy
        busy[0] += size
        busy[1] += seconds
        if busy[1] >= 0.5:
            rate = busy[0] / busy[1]
            self.drain_bps = rate if self.drain_bps is None else (self.drain_bps + rate) / 2
            busy[0], busy[1] = 0, 0.0
            if self.unsent_bound is not None and unsent_budget(self.drain_bps) != self.unsent_bound:
                self.bound_unsent()

    def bound_unsent(self) -> None:
        """Keep this link's unsent bytes in the endpoint's queue, not the kernel's (keep_unsent_small), beyond
        what the link drains in UNSENT_BUDGET_S; re-applied as the drain rate is measured. Connectors do this."""
        self.unsent_bound = unsent_budget(self.drain_bps)
        keep_unsent_small(self.socket(), self.unsent_bound)

    def _tell_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        raise NotImplementedError

    def socket(self) -> socket.socket | None:
        return None  # the Flight tunnel: gRPC's sockets are its own
