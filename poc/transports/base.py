"""What every transport shares: one writer at a time, so frames leave in the order the core queued them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..tunnel.endpoint import _Endpoint


class OrderedWriter:
    """Mixin: `call`, `flush` and `flush_soon` over a subclass's `_send_queued()`."""

    endpoint: _Endpoint
    _closed_errors: tuple[type[BaseException], ...] = ()

    def _init_writer(self) -> None:
        self._write_lock = asyncio.Lock()
        self._flush_scheduled = False

    async def _send_queued(self) -> None:
        raise NotImplementedError

    async def call(self, produce: Callable[..., Any], *args: Any) -> Any:
        """Run `produce` on the endpoint and send what it queued, holding the writer."""
        async with self._write_lock:
            result = produce(*args)
            await self._send_queued()
            return result

    async def flush(self) -> None:
        """Send whatever the endpoint has queued."""
        async with self._write_lock:
            await self._send_queued()

    def flush_soon(self) -> None:
        """Schedule a flush when the endpoint queued something; calls made before it runs share it.
        Called after every received frame, so most calls (data frames queue nothing) create no task."""
        if not self._flush_scheduled and self.endpoint.has_data_to_send:
            self._flush_scheduled = True
            asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        self._flush_scheduled = False
        try:
            await self.flush()
        except self._closed_errors:
            pass  # the reader sees the close and fails what was in flight
