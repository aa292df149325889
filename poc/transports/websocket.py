"""The WebSocket transport: drives a tunnel endpoint over one `websockets` connection.

Drive the core, then flush: every received message goes to the endpoint, the
caller handles the events it returns, and what the endpoint queued is sent by
one writer at a time so that frames leave in the order they were queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Event, _Endpoint
from .base import OrderedWriter

log = logging.getLogger(__name__)


class WebSocketLink(OrderedWriter):
    """One endpoint moved over one WebSocket connection."""

    _closed_errors = (ConnectionClosed,)

    def __init__(self, ws: Connection, endpoint: _Endpoint) -> None:
        self.ws = ws
        self.endpoint = endpoint
        self._init_writer()

    async def events(self) -> AsyncIterator[list[Event]]:
        """Yield the events of each received message until the link closes, then raise TunnelClosed."""
        try:
            async for message in self.ws:
                now = time.monotonic()
                if isinstance(message, str):
                    events = self.endpoint.receive_text(message, now)
                else:
                    events = self.endpoint.receive_binary(message, now)
                yield events
                self.flush_soon()
        except RemoteProtocolError as exc:
            log.warning("closing link: %s", exc)
            closing = asyncio.get_running_loop().create_task(self.close(exc.close_code, str(exc)))
            try:  # discard what the peer had already sent, so that its close reply is read at once
                async for _ in self.ws:
                    pass
            except ConnectionClosed:
                pass
            await closing
            raise TunnelClosed(exc.close_code, str(exc)) from exc
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        raise self._closed(None)

    def _closed(self, exc: ConnectionClosed | None) -> TunnelClosed:
        frame = (exc.rcvd or exc.sent) if exc is not None else None
        if frame is not None:
            return TunnelClosed(frame.code, frame.reason or "closed")
        if self.ws.close_code is not None:
            return TunnelClosed(self.ws.close_code, self.ws.close_reason or "closed")
        return TunnelClosed(1006, "connection lost without a close frame")

    async def _send_queued(self) -> None:
        for item in self.endpoint.data_to_send():
            await self.ws.send(item)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with a code and a reason (docs/protocol.md §8); reasons are cut to fit a close frame."""
        await self.ws.close(code, reason.encode()[:120].decode("utf-8", "ignore"))
