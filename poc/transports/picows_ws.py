"""The same tunnel over picows, a WebSocket implementation in Cython: fewer copies per frame.

Same contract as every transport (`base.TunnelTransport`); frames are queued by picows' callbacks and fed
to the core by the reader, so events are handled in the same step as the core produced them.
Received payloads are copied once out of picows' read buffer (it reuses that buffer); sent frames are
copied once into its write buffer, masked on the way for a client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from picows import (WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, WSUpgradeResponse,
                    WSUpgradeResponseWithListener, ws_connect, ws_create_server)

from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Endpoint
from .base import Link
from .memory import arrow_copy

log = logging.getLogger(__name__)
_CLOSED = object()
IDLE_READ_BUFFER = 2048  # picows' default is 16 KiB per connection


class PicowsLink(WSListener, Link):
    """One endpoint moved over one picows connection; also its listener."""

    KIND = "picows"

    def __init__(self, endpoint_factory: Callable[[], Endpoint], max_message: int) -> None:
        super().__init__()
        self._init_link(endpoint_factory())
        self.transport: WSTransport | None = None
        self._max_message = max_message  # a whole message, fragments included
        # What asyncio.Queue and asyncio.Event would do, for one reader and one writer, without their deques
        # (about 2 KiB per connection, most of an idle tunnel's cost: docs/results.md, scale).
        self._inbox: list = []  # received messages not yet taken by _receive
        self._arrived: asyncio.Future | None = None  # set when _receive waits for the inbox to fill
        self._resumed: asyncio.Future | None = None  # set while writing is paused
        self._fragments: list[bytes] = []
        self._fragment_bytes = 0
        self._fragment_type: WSMsgType | None = None
        self.connected = asyncio.get_running_loop().create_future()

    # -- picows callbacks (run on the event loop)
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if not self.connected.done():
            self.connected.set_result(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            self._on_close(frame)
            return
        if kind in (WSMsgType.PING, WSMsgType.PONG) or self.closed is not None:
            return  # picows answers pings itself
        if kind == WSMsgType.CONTINUATION or not frame.fin:  # a fragmented message: rare, reassembled, capped
            if kind != WSMsgType.CONTINUATION:
                self._fragment_type, self._fragments, self._fragment_bytes = kind, [], 0
            elif self._fragment_type is None:
                self._close_now(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
                return
            self._fragment_bytes += frame.payload_size
            if self._fragment_bytes > self._max_message:
                self._close_now(CloseCode.MESSAGE_TOO_BIG, f"fragmented message over {self._max_message} bytes")
                return
            self._fragments.append(frame.get_payload_as_bytes())
            if not frame.fin:
                return
            kind, data = self._fragment_type, b"".join(self._fragments)
            self._fragment_type, self._fragments, self._fragment_bytes = None, [], 0
        elif kind == WSMsgType.BINARY:  # the one copy (picows reuses its read buffer), into Arrow's memory
            data = arrow_copy(frame.get_payload_as_memoryview())
        else:
            data = frame.get_payload_as_bytes()
        self._put((kind == WSMsgType.TEXT, data))

    def _on_close(self, frame: WSFrame) -> None:
        code = int(frame.get_close_code() or 1005)
        reason = frame.get_close_message()
        reason = bytes(reason).decode("utf-8", "replace") if reason else "closed"
        if self.closed is None:
            self.closed = TunnelClosed(code, reason)
            self.transport.send_close(_close_code(code), b"")
        self.transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.closed is None:
            self.closed = TunnelClosed(1006, "connection lost without a close frame")
        self.resume_writing()
        self._put(_CLOSED)
        if not self.connected.done():
            self.connected.set_exception(OSError(str(self.closed)))

    def _put(self, item) -> None:
        self._inbox.append(item)
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def pause_writing(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    # -- the adapter of base.Link
    async def _receive(self) -> AsyncIterator[str | bytes]:
        while True:
            if not self._inbox:
                self._arrived = asyncio.get_running_loop().create_future()
                try:
                    await self._arrived
                finally:
                    self._arrived = None
            batch, self._inbox = self._inbox, []
            for item in batch:
                if item is _CLOSED:
                    return
                yield self._message(item)

    @staticmethod
    def _message(item: tuple[bool, bytes]) -> str | bytes:
        text, data = item
        if text:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("text frame is not valid UTF-8") from None
        return data

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(1006, "connection lost without a close frame")

    def _can_send_now(self) -> bool:
        """Also while writing is paused: the message then waits behind the frame being written, which is
        where the writer would put it too."""
        return self.transport is not None and self.closed is None

    def socket(self):
        return self.transport.underlying_transport.get_extra_info("socket") if self.transport else None

    def _send_now(self, text: str) -> None:
        self.transport.send(WSMsgType.TEXT, text.encode())

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        if isinstance(item, str):
            self.transport.send(WSMsgType.TEXT, item.encode())
        else:
            self.transport.send(WSMsgType.BINARY, item)
        while self._resumed is not None:
            await asyncio.shield(self._resumed)  # the socket buffer is over its high-water mark

    def _close_now(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = TunnelClosed(code, reason)
            log.warning("closing link: %s", reason)
        if self.transport.is_close_frame_sent:
            return
        self.transport.send_close(_close_code(code), reason.encode()[:120])
        # The peer's close reply ends the link (_on_close); a peer that never answers is cut off after 3 s.
        # Cutting at once would reset a peer that is still sending, and it would never read the close code.
        asyncio.get_running_loop().call_later(3.0, self.transport.disconnect)

    async def _close_for(self, code: int, reason: str) -> None:
        self._close_now(code, reason)
        await self.transport.wait_disconnected()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.transport is None:
            return
        self._close_now(code, reason)
        await self.transport.wait_disconnected()


def _close_code(code: int) -> WSCloseCode:
    try:
        return WSCloseCode(code)
    except ValueError:
        return code  # picows passes application codes (4000-4999) through as ints


async def serve_picows(on_link: Callable[[PicowsLink], Any], endpoint_factory: Callable[[], Endpoint], host: str,
                       port: int, ssl: ssl_module.SSLContext | None, max_frame_size: int) -> asyncio.AbstractServer:
    """Accept tunnels on /connect; `on_link(link)` runs as a task per connection."""
    loop = asyncio.get_running_loop()

    def factory(request: WSUpgradeRequest):
        if request.path.split(b"?")[0] != b"/connect":
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(HTTPStatus.NOT_FOUND, b"the tunnel endpoint is /connect\n"),
                None)
        link = PicowsLink(endpoint_factory, max_frame_size)
        link.connected.add_done_callback(lambda f: not f.exception() and loop.create_task(on_link(link)))
        return link

    # An idle tunnel only ever reads heartbeats: a small first read buffer (picows grows it as frames need)
    # keeps thousands of idle tunnels cheap (docs/results.md, scale).
    return await ws_create_server(factory, host, port, ssl=ssl, max_frame_size=max_frame_size,
                                  websocket_handshake_timeout=10, read_buffer_init_size=IDLE_READ_BUFFER)


async def dial_picows(url: str, endpoint_factory: Callable[[], Endpoint], ssl: ssl_module.SSLContext | None,
                      heartbeat_s: float, max_frame_size: int, sock: socket.socket | None = None,
                      proxy: str | None = None) -> PicowsLink:
    """Open a tunnel to the gateway (over `sock` when given: already connected to one of the name's
    addresses; through the HTTP proxy `proxy`, with HTTP CONNECT, when given); the link is connected when this
    returns."""
    _, link = await ws_connect(lambda: PicowsLink(endpoint_factory, max_frame_size), url, ssl_context=ssl,
                               socket_factory=(lambda _: sock) if sock is not None else None,
                               enable_auto_ping=True, auto_ping_idle_timeout=heartbeat_s,
                               auto_ping_reply_timeout=heartbeat_s, max_frame_size=max_frame_size,
                               websocket_handshake_timeout=10, proxy=proxy)
    if link is None or link.closed is not None:
        raise ConnectionError(f"tunnel to {url} closed during the handshake")
    link.bound_unsent()
    return link
