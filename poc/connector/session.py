"""One registered link of a connector: the gateway's requests in, one task per stream, credit waits, the link's
frame size and compression, heartbeats. What to send is the serving's (poc.connector.serving); which gateway, and
what to do when a link ends, is the pool's (poc.connector.pool), told through `SessionHooks`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..transports.base import TunnelTransport
from ..tunnel import CloseCode, ConnectorEndpoint, FrameType
from ..tunnel import events as ev
from ..tunnel.messages import clip
from .config import RETRY_LATER, ConnectorConfig, RefusedForNow, RegistrationRefused
from .metrics import ConnectorMetrics
from .serving import Serving

log = logging.getLogger("poc.connector")

COMPRESS_MIN_RTT_S = 0.002  # --compression auto: links with a shorter round trip are local, never compressed
FIRST_HEARTBEAT_GAP_S = 1.0  # a link's heartbeats start this far apart and double up to the heartbeat interval
FRAME_BUDGET_S = 0.02  # a frame should take no longer than this to leave: a control message waits for one
MIN_FRAME_BYTES = 64 * 1024


def frame_budget(drain_bps: float | None, max_frame: int) -> int:
    """The largest frame a link should carry: what it drains in FRAME_BUDGET_S, as a power of two from
    MIN_FRAME_BYTES up to the gateway's max_frame_bytes (that, while the link's rate is unknown). On a slow
    link a control message then waits for a short frame, not for a 2 MiB batch (335 ms at 50 Mbit/s:
    docs/results.md); batches are cut to fit, once per size, and kept."""
    if drain_bps is None:
        return max_frame
    size = MIN_FRAME_BYTES
    while size * 2 <= min(drain_bps * FRAME_BUDGET_S, max_frame):
        size *= 2
    return min(size, max_frame)


@dataclass
class SessionHooks:
    """What a session tells its pool: it registered (with its session id), and the gateway said goaway."""

    registered: Callable[["Session", str], None]
    goaway: Callable[["Session", str, str | None], None]


class Session:
    """One registered link: answers requests and runs one task per stream."""

    def __init__(self, cfg: ConnectorConfig, serving: Serving, metrics: ConnectorMetrics, transport: TunnelTransport,
                 hooks: SessionHooks, url: str = "", slot: int = 0, stop: asyncio.Event | None = None) -> None:
        self.cfg = cfg
        self.serving = serving
        self.metrics = metrics
        self.transport = transport
        self.hooks = hooks
        self.url = url
        self.slot = slot
        self.stop = stop or asyncio.Event()
        self.goaway = False  # the gateway said goaway on this link
        self.registered = False
        self.session_id: str | None = None
        self.endpoint: ConnectorEndpoint = transport.endpoint
        self.tasks: dict[int, asyncio.Task] = {}
        self.info_tasks: set[asyncio.Future] = set()  # flight_info and query_info answers being worked out
        self.credit: dict[int, asyncio.Event] = {}
        self.traces: dict[int, str | None] = {}  # stream → the Flight call's request id, for log lines
        self.compressing_now = False  # --compression auto: whether batches go compressed on this link now
        self.rtt_s: float | None = None  # the smallest heartbeat round trip seen on this link
        self.data_calls = getattr(transport, "data_calls", False)  # each stream on its own call (Flight tunnel)

    async def serve(self) -> None:
        events = self.transport.events()
        heartbeat = None
        try:
            first = await asyncio.wait_for(anext(events), 10)
            self._on_registration(first[0])
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeats())
            async for batch in events:
                for event in batch:
                    self._handle(event)
        except StopAsyncIteration:
            pass
        finally:
            for task in [*self.tasks.values(), *self.info_tasks, heartbeat]:
                if task is not None:
                    task.cancel()
            if self.metrics is not None and self.rtt_s is not None:
                with contextlib.suppress(KeyError):  # another link to that gateway ended first
                    self.metrics.link_rtt.remove(self.url)
            await events.aclose()

    def _on_registration(self, event: ev.Event) -> None:
        if isinstance(event, ev.RegistrationRefused):
            refused = RefusedForNow if event.code in RETRY_LATER else RegistrationRefused
            raise refused(f"gateway refused the registration ({event.code}): {event.message}")
        self.session_id = event.registered.session_id
        self.registered = True
        if self.data_calls:
            self.transport.session_id = self.session_id  # it names the stream's data calls (docs/protocol.md §13)
        log.info("registered tenant %s as session %s at %s", self.cfg.tenant_id, self.session_id,
                 self.url or self.cfg.gateway)
        self.hooks.registered(self, self.session_id)

    def _handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamRequested):
            self._start_stream(event)
        elif isinstance(event, ev.CreditGranted):
            self.credit[event.stream_id].set()
        elif isinstance(event, ev.StreamCancelled):
            task = self.tasks.get(event.stream_id)
            if task is not None:
                task.cancel()
                log.info("stream %d cancelled by the gateway: %s", event.stream_id, event.reason,
                         extra=self.context(event.stream_id))
        elif isinstance(event, ev.FlightInfoRequested):
            answer = self.serving.flight_info(self, event)
            if answer is not None:  # worked out in a task of this session (cancelled with it)
                self.info_tasks.add(answer)
                answer.add_done_callback(self.info_tasks.discard)
        elif isinstance(event, ev.GoAwayReceived):
            if not self.goaway:
                self.goaway = True
                self.hooks.goaway(self, event.reason, event.prefer)
        elif isinstance(event, ev.HeartbeatAcked):
            rtt = max(0.0, time.time() - event.ts)
            self.rtt_s = rtt if self.rtt_s is None else min(self.rtt_s, rtt)
            if self.metrics is not None:
                self.metrics.link_rtt.labels(self.url).set(self.rtt_s)
        elif isinstance(event, ev.RequestFailed):
            log.warning("gateway reported an error (%s): %s", event.code, event.message)
        elif isinstance(event, ev.RequestRefused):  # answered with an error for that request; the link goes on
            log.warning("refused request %d of the gateway: %s", event.request_id, event.reason,
                        extra=self.context())

    def _start_stream(self, event: ev.StreamRequested) -> None:
        self.metrics.requests.labels("do_get").inc()
        self.metrics.streams.inc()
        self.traces[event.stream_id] = event.trace_id
        if event.sql is None:
            log.info("do_get %s%s", event.dataset, "" if event.from_row is None else
                     f" resumed from row {event.from_row}", extra=self.context(event.stream_id))
        else:
            log.info("query %s", clip(" ".join(event.sql.split()), 200), extra=self.context(event.stream_id))
        self.credit[event.stream_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self.serving.stream(self, event.stream_id, event.dataset, event.sql, event.params, event.from_row,
                                event.fingerprint))
        self.tasks[event.stream_id] = task
        task.add_done_callback(lambda _, sid=event.stream_id: self._forget(sid))

    async def retire(self, wait_s: float = 60.0) -> None:
        """After a goaway, once the replacement is registered: the gateway closes this link when the tenant's
        new tunnel is in its registry and this link carries no stream (it knows what it has sent). A gateway
        that has not done so after `wait_s` gets the link closed from here, once its streams have ended."""
        deadline = time.monotonic() + wait_s
        while self.transport.closed is None and (time.monotonic() < deadline or self.tasks
                                                 or self.endpoint.has_data_to_send):
            await asyncio.sleep(0.1)
        if self.transport.closed is None:
            log.info("closing the link to %s: its replacement is registered", self.url)
            with contextlib.suppress(Exception):
                await self.transport.close(CloseCode.NORMAL, "moved to another gateway")

    def context(self, stream_id: int | None = None) -> dict:
        """The fields of a log line about this session, or one of its streams (poc.logs)."""
        context = {"tenant": self.cfg.tenant_id, "session": self.session_id}
        if stream_id is not None:
            context.update(stream_id=stream_id, request_id=self.traces.get(stream_id))
        return context

    def _forget(self, stream_id: int) -> None:
        if self.data_calls:
            self.transport.drop_data(stream_id)  # a no-op once the stream was sent to its END
        self.metrics.streams.dec()
        self.traces.pop(stream_id, None)
        self.tasks.pop(stream_id, None)
        self.credit.pop(stream_id, None)

    async def _heartbeats(self) -> None:
        """At the gateway's interval (§10), or this connector's own when that is shorter. The first goes at once,
        so that the link's round trip is known from the start (its ack: `rtt_s`, the smallest seen). While that
        round trip still reads wide-area and `--compression auto` may act on it, the next ones go
        FIRST_HEARTBEAT_GAP_S apart, the gap doubling up to the interval: one heartbeat answered while either end
        was busy (connectors and gateway starting side by side) read a loopback link as wide-area, and the next
        came a minute later under load; several in the link's first minute let a quiet moment set the round
        trip (docs/results.md). Otherwise the schedule is the interval's alone."""
        interval = min(self.cfg.heartbeat_s, self.endpoint.registered.heartbeat_s)
        gap = min(FIRST_HEARTBEAT_GAP_S, interval)
        while True:
            await self.transport.call(self.endpoint.heartbeat, time.time())
            await asyncio.sleep(gap)  # its ack comes back meanwhile: whether to go on measuring is known after
            if not self._measuring_distance():
                await asyncio.sleep(interval - gap)
            gap = min(gap * 2, interval)

    def _measuring_distance(self) -> bool:
        """Whether more heartbeats would tell `compressing()` something: it may compress (auto, a codec agreed)
        and no round trip under COMPRESS_MIN_RTT_S has come back yet (the smallest only falls)."""
        return (self.cfg.compression == "auto" and self.endpoint.codec is not None
                and (self.rtt_s is None or self.rtt_s >= COMPRESS_MIN_RTT_S))

    # -- what serving uses to answer (poc.connector.serving.Link)

    def open(self, stream_id: int) -> bool:
        """Whether the stream is still open (not ended, failed or cancelled)."""
        return self.endpoint.credit(stream_id) >= 0

    def resumable(self, stream_id: int, fingerprint: str) -> None:
        self.endpoint.resumable(stream_id, fingerprint)  # a control message: it leaves ahead of the SCHEMA
        self.transport.flush_soon()

    def max_frame(self) -> int:
        return frame_budget(self.transport.drain_bps, self.endpoint.registered.max_frame_bytes)

    def end(self, stream_id: int) -> None:
        if self.data_calls:
            self.endpoint.end_stream_elsewhere(stream_id)
            self.transport.end_data(stream_id)
            return
        self.endpoint.send_frame(FrameType.END, stream_id)
        self.transport.flush_soon()

    async def fail(self, request_id: int, code: str, message: str) -> None:
        await self.transport.call(self.endpoint.fail_request, request_id, code, message)
        if self.data_calls:
            self.transport.drop_data(request_id)

    def fail_now(self, request_id: int, code: str, message: str) -> None:
        self.endpoint.fail_request(request_id, code, message)  # the transport flushes after each event

    async def reply_info(self, request_id: int, schema: bytes, rows: int, size: int,
                         parameters: bytes | None = None) -> None:
        await self.transport.call(self.endpoint.reply_flight_info, request_id, schema, rows, size, parameters)

    def reply_info_now(self, request_id: int, schema, rows: int, size: int) -> None:
        self.endpoint.reply_flight_info(request_id, schema, rows, size)

    def compressing(self) -> bool:
        """Whether the next batch goes compressed: a codec was agreed (protocol §4b) and --compression says
        always, or auto and the link is a slow wide-area one: its heartbeat round trip is at least
        COMPRESS_MIN_RTT_S and it drains slower than --compress-below-mbps. Decompressing costs the gateway
        CPU, which only a slow link repays; a link inside one site that drains slowly does so because the
        gateway is busy, and compressing would slow it further (docs/results.md)."""
        cfg = self.cfg
        if self.endpoint.codec is None or cfg.compression == "off":
            return False
        if cfg.compression == "always":
            return True
        rate = self.transport.drain_bps
        slow = (rate is not None and rate * 8 / 1e6 < cfg.compress_below_mbps
                and self.rtt_s is not None and self.rtt_s >= COMPRESS_MIN_RTT_S)
        if slow != self.compressing_now:
            self.compressing_now = slow
            log.info("link drains at %.0f Mbit/s: batches go %s", (rate or 0) * 8 / 1e6,
                     f"compressed ({self.endpoint.codec})" if slow else "uncompressed", extra=self.context())
        return slow

    async def compressed(self, dataset, max_frame: int, index: int) -> tuple[bytearray, int] | None:
        """A held dataset's batch compressed with the link's codec when compressing pays now, else None. The
        first request for a batch compresses it in a thread (pyarrow lets the event loop run meanwhile); later
        ones reuse it."""
        if not self.compressing():
            return None
        codec, limit = self.endpoint.codec, self.endpoint.registered.max_frame_bytes  # a charge fits a frame
        if dataset.is_cut(max_frame, codec, index, limit):
            return dataset.compressed_frame(codec, max_frame, index, limit)
        return await asyncio.to_thread(dataset.compressed_frame, codec, max_frame, index, limit)

    async def send(self, stream_id: int, frame_type: FrameType, payload=b"", framed: bytearray | None = None,
                   charge: int | None = None) -> None:
        """Queue one frame once the stream has credit for it (docs/protocol.md §5); the link's writer sends it
        in the stream's turn. A `framed` buffer is shared by every stream of the dataset, on every link: the
        writer writes its header as it hands it to the socket (poc.tunnel.endpoint)."""
        size = len(framed) - 8 if framed is not None else len(payload)
        if self.data_calls:  # its own call, held back by HTTP/2 rather than credit (docs/protocol.md §13)
            if self.endpoint.credit(stream_id) < 0:
                raise asyncio.CancelledError
            data = memoryview(framed)[8:] if framed is not None else memoryview(payload)
            try:
                await self.transport.send_data(stream_id, data)
            except ConnectionError as exc:  # the gateway ended the call: the stream was cancelled there
                log.info("stream %d cancelled by the gateway: its data call ended (%s)", stream_id, exc,
                         extra=self.context(stream_id))
                raise asyncio.CancelledError from None
            self.metrics.sent_bytes.inc(size)
            return
        cost = size if charge is None else charge
        if 0 <= self.endpoint.credit(stream_id) < cost:
            self.metrics.credit_waits.inc()
        while self.endpoint.credit(stream_id) < cost:
            if self.endpoint.credit(stream_id) < 0:
                raise asyncio.CancelledError
            event = self.credit[stream_id]
            event.clear()
            await event.wait()
        self.endpoint.send_frame(frame_type, stream_id, memoryview(payload), framed=framed, charge=charge)
        self.transport.flush_soon()
        self.metrics.sent_bytes.inc(size)
