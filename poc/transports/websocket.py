"""The tunnel over one `websockets` connection: the receive loop and writer of `base.Link`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from ..tunnel import CloseCode, TunnelClosed
from ..tunnel.endpoint import Endpoint
from .base import Link


class WebSocketLink(Link):
    """One endpoint moved over one WebSocket connection."""

    KIND = "websockets"
    _closed_errors = (ConnectionClosed,)

    def __init__(self, ws: Connection, endpoint: Endpoint) -> None:
        self.ws = ws
        self._init_link(endpoint)

    def socket(self):
        return self.ws.transport.get_extra_info("socket")

    async def _receive(self) -> AsyncIterator[str | bytes]:
        try:
            async for message in self.ws:
                yield message
        except ConnectionClosed:
            pass

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        await self.ws.send(item)

    async def _close_for(self, code: int, reason: str) -> None:
        async def discard() -> None:  # what the peer had already sent, so that its close reply is read at once
            try:
                async for _ in self.ws:
                    pass
            except ConnectionClosed:
                pass
        closing = asyncio.get_running_loop().create_task(self.close(code, reason))
        await discard()
        await closing

    def _ended(self) -> TunnelClosed:
        frame = self.ws.protocol.close_rcvd or self.ws.protocol.close_sent
        if frame is not None:
            return TunnelClosed(frame.code, frame.reason or "closed")
        return TunnelClosed(1006, "connection lost without a close frame")

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with a code and a reason (docs/protocol.md §8); reasons are cut to fit a close frame."""
        self.closed = self.closed or TunnelClosed(code, reason)
        await self.ws.close(code, reason.encode()[:120].decode("utf-8", "ignore"))
