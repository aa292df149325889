"""The writer every transport shares, over a fake connection: no socket."""

from __future__ import annotations

import asyncio

from poc.transports.base import Link
from poc.tunnel import ConnectorEndpoint


class SlowLink(Link):
    """Each message takes a moment to leave, like a write waiting on the socket."""

    def __init__(self) -> None:
        self._init_link(ConnectorEndpoint())
        self.sent: list = []

    async def _transmit(self, item) -> None:
        await asyncio.sleep(0.01)
        self.sent.append(item)


def test_a_cancelled_writer_still_sends_what_others_queued():
    """A connector cancels a stream's task while it sends: the replies other tasks queued meanwhile (taken
    from the core in the same batch) must still leave, or their requests hang."""
    async def main():
        link = SlowLink()
        queue = link.endpoint._outbox
        writer = asyncio.get_running_loop().create_task(link.call(lambda: queue.extend(["a", "b", "c"])))
        await asyncio.sleep(0.005)  # "a" is being written
        writer.cancel()
        try:
            await writer
        except asyncio.CancelledError:
            pass
        return link.sent, writer.cancelled()

    sent, cancelled = asyncio.run(main())
    assert sent == ["a", "b", "c"] and cancelled
