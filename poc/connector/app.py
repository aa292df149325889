"""The connector process: one outbound WebSocket, datasets from Parquet, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass

import grpc.aio
from picows import WSError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from .. import config
from ..catalog import Dataset
from ..transports.base import TunnelTransport
from ..transports.websocket import WebSocketLink
from ..tunnel import CloseCode, ConnectorEndpoint, FrameType, TunnelClosed
from ..tunnel import endpoint as ev
from ..tunnel.messages import clip
from .metrics import ConnectorMetrics

log = logging.getLogger("poc.connector")


class RegistrationRefused(Exception):
    """The gateway refused the registration (bad token, bad version): retrying would not help."""


class Replaced(Exception):
    """A newer connector registered for this tenant (close 4002): reconnecting would only fight it."""


@dataclass
class ConnectorConfig:
    gateway: str
    tenant_id: str
    token: str
    delay_ms: tuple[float, float] = config.DELAY_MS
    heartbeat_s: float = config.HEARTBEAT_S
    backoff_initial_s: float = config.BACKOFF_INITIAL_S
    backoff_max_s: float = config.BACKOFF_MAX_S
    ca_file: str | None = None
    ws_impl: str = config.WS_IMPL

    def __repr__(self) -> str:  # the token never reaches logs
        return f"ConnectorConfig(gateway={self.gateway!r}, tenant_id={self.tenant_id!r})"


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so returning connectors spread out."""
    base = min(cap, initial * 2 ** attempt)
    return base / 2 + rng.uniform(0, base / 2)


class Connector:
    def __init__(self, cfg: ConnectorConfig, datasets: dict[str, Dataset]) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.session_id: str | None = None
        self.sessions = 0
        self.online = False  # registered on a live link right now
        self.on_registered = None
        self.metrics = ConnectorMetrics()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop` is set; reconnect with backoff; raise RegistrationRefused."""
        attempt = 0
        while not stop.is_set():
            sessions_before = self.sessions
            try:
                await self._session(stop)
            except RegistrationRefused:
                raise
            except TunnelClosed as exc:
                if exc.code == CloseCode.REPLACED:
                    raise Replaced(f"gateway closed the link: {exc.reason}") from None
                if exc.code == CloseCode.TENANT_REMOVED:
                    raise RegistrationRefused(f"gateway closed the link: {exc.reason}") from None
                log.warning("link to %s lost: %s", self.cfg.gateway, exc)
            except (OSError, InvalidHandshake, asyncio.TimeoutError, WSError, grpc.aio.AioRpcError) as exc:
                log.warning("link to %s lost: %s", self.cfg.gateway, exc or type(exc).__name__)
            except Exception:  # whatever else ended the session, a new link may cure it: reconnect, never exit
                log.exception("session with %s failed", self.cfg.gateway)
            if stop.is_set():
                return
            self.online = False
            self.metrics.registered.set(0)
            self.metrics.reconnects.inc()
            attempt = 0 if self.sessions > sessions_before else attempt + 1
            delay = backoff_delay(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
            log.info("reconnecting in %.2f s (attempt %d)", delay, attempt + 1)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.cfg.gateway.startswith("wss://"):
            return None
        return ssl.create_default_context(cafile=self.cfg.ca_file)

    @contextlib.asynccontextmanager
    async def _dial(self):
        """The link to the gateway; the URL's scheme picks gRPC or WebSocket, --ws-impl the WebSocket library."""
        cfg = self.cfg
        if cfg.gateway.startswith(("ws://", "wss://")) and cfg.ws_impl == "websockets":
            async with connect(cfg.gateway, compression=None, proxy=None, ssl=self._ssl_context(),
                               max_size=config.MAX_FRAME_BYTES, ping_interval=cfg.heartbeat_s,
                               ping_timeout=cfg.heartbeat_s, write_limit=1024 * 1024, open_timeout=10) as ws:
                yield WebSocketLink(ws, ConnectorEndpoint())
            return
        if cfg.gateway.startswith(("grpc://", "grpcs://")):
            from ..transports.grpc_tunnel import dial_grpc

            ca = open(cfg.ca_file, "rb").read() if cfg.ca_file else None
            link = await dial_grpc(cfg.gateway.split("://", 1)[1].rstrip("/"), ConnectorEndpoint, ca,
                                   cfg.gateway.startswith("grpcs://"), cfg.heartbeat_s, config.MAX_FRAME_BYTES)
        else:
            from ..transports.picows_ws import dial_picows

            link = await dial_picows(cfg.gateway, ConnectorEndpoint, self._ssl_context(), cfg.heartbeat_s,
                                     config.MAX_FRAME_BYTES)
        try:
            yield link
        finally:
            if link.closed is None:
                await link.close(CloseCode.GOING_AWAY, "connector shutting down")

    async def _session(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        async with self._dial() as transport:
            endpoint = transport.endpoint
            await transport.call(endpoint.register, cfg.tenant_id, cfg.token, sorted(self.datasets))
            session = _Session(self, transport)
            stopper = asyncio.get_running_loop().create_task(self._close_on(stop, transport))
            try:
                await session.serve()
            finally:
                stopper.cancel()

    @staticmethod
    async def _close_on(stop: asyncio.Event, transport: TunnelTransport) -> None:
        await stop.wait()
        await transport.close(1001, "connector shutting down")


class _Session:
    """One registered link: answers requests and runs one task per stream."""

    def __init__(self, connector: Connector, transport: TunnelTransport) -> None:
        self.connector = connector
        self.transport = transport
        self.endpoint: ConnectorEndpoint = transport.endpoint
        self.tasks: dict[int, asyncio.Task] = {}
        self.credit: dict[int, asyncio.Event] = {}
        self.traces: dict[int, str | None] = {}  # stream → the Flight call's request id, for log lines

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
            for task in [*self.tasks.values(), heartbeat]:
                if task is not None:
                    task.cancel()
            await events.aclose()

    def _on_registration(self, event: ev.Event) -> None:
        if isinstance(event, ev.RegistrationRefused):
            raise RegistrationRefused(f"gateway refused the registration ({event.code}): {event.message}")
        connector = self.connector
        connector.session_id = event.registered.session_id
        connector.sessions += 1
        connector.online = True
        connector.metrics.registered.set(1)
        log.info("registered tenant %s as session %s", connector.cfg.tenant_id, connector.session_id)
        if connector.on_registered:
            connector.on_registered(connector.session_id)

    def _handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamRequested):
            self.connector.metrics.requests.labels("do_get").inc()
            self.connector.metrics.streams.inc()
            self.traces[event.stream_id] = event.trace_id
            log.info("do_get %s", event.dataset, extra=self._context(event.stream_id))
            self.credit[event.stream_id] = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._stream(event.stream_id, event.dataset))
            self.tasks[event.stream_id] = task
            task.add_done_callback(lambda _, sid=event.stream_id: self._forget(sid))
        elif isinstance(event, ev.CreditGranted):
            self.credit[event.stream_id].set()
        elif isinstance(event, ev.StreamCancelled):
            task = self.tasks.get(event.stream_id)
            if task is not None:
                task.cancel()
                log.info("stream %d cancelled by the gateway: %s", event.stream_id, event.reason,
                         extra=self._context(event.stream_id))
        elif isinstance(event, ev.FlightInfoRequested):
            self.connector.metrics.requests.labels("get_flight_info").inc()
            log.info("get_flight_info %s", event.dataset, extra={**self._context(), "request_id": event.trace_id})
            self._answer_flight_info(event)
        elif isinstance(event, ev.RequestFailed):
            log.warning("gateway reported an error (%s): %s", event.code, event.message)

    def _context(self, stream_id: int | None = None) -> dict:
        """The fields of a log line about this session, or one of its streams (poc.logs)."""
        context = {"tenant": self.connector.cfg.tenant_id, "session": self.connector.session_id}
        if stream_id is not None:
            context.update(stream_id=stream_id, request_id=self.traces.get(stream_id))
        return context

    def _forget(self, stream_id: int) -> None:
        self.connector.metrics.streams.dec()
        self.traces.pop(stream_id, None)
        self.tasks.pop(stream_id, None)
        self.credit.pop(stream_id, None)

    def _answer_flight_info(self, event: ev.FlightInfoRequested) -> None:
        ds = self.connector.datasets.get(event.dataset)
        if ds is None:
            self.endpoint.fail_request(event.request_id, "not_found", f"dataset {event.dataset!r} not found")
        else:
            self.endpoint.reply_flight_info(event.request_id, ds.schema_message, ds.rows, ds.ipc_bytes)

    async def _heartbeats(self) -> None:
        """At the gateway's interval (§10), or this connector's own when that is shorter."""
        interval = min(self.connector.cfg.heartbeat_s, self.endpoint.registered.heartbeat_s)
        while True:
            await asyncio.sleep(interval)
            await self.transport.call(self.endpoint.heartbeat, time.time())

    async def _stream(self, stream_id: int, name: str) -> None:
        try:
            await self._stream_dataset(stream_id, name)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # a failed transfer must end in an error frame, never in silence
            log.exception("stream of %r failed", name, extra=self._context(stream_id))
            if self.endpoint.credit(stream_id) >= 0:
                await self.transport.call(self.endpoint.fail_request, stream_id, "internal", clip(str(exc)))

    async def _stream_dataset(self, stream_id: int, name: str) -> None:
        ds = self.connector.datasets.get(name)
        if ds is None:
            await self.transport.call(self.endpoint.fail_request, stream_id, "not_found", f"dataset {name!r} not found")
            return
        low, high = self.connector.cfg.delay_ms
        if high > 0:
            await asyncio.sleep(random.uniform(low, high) / 1000)  # simulated extraction
        await self._send(stream_id, FrameType.SCHEMA, ds.schema_message)
        for framed in ds.framed_messages(self.endpoint.registered.max_frame_bytes):
            await self._send(stream_id, FrameType.BATCH, framed=framed)
        await self.transport.call(self.endpoint.send_frame, FrameType.END, stream_id)
        log.info("stream of %r sent: %d rows", name, ds.rows, extra=self._context(stream_id))

    async def _send(self, stream_id: int, frame_type: FrameType, payload=b"", framed: bytearray | None = None) -> None:
        """Send one frame once the stream has credit for it (docs/protocol.md §5).

        A `framed` buffer is shared by every stream of the dataset: its header is written and the frame
        sent while the link's writer is held, so no other stream touches it meanwhile."""
        size = len(framed) - 8 if framed is not None else len(payload)
        if 0 <= self.endpoint.credit(stream_id) < size:
            self.connector.metrics.credit_waits.inc()
        while self.endpoint.credit(stream_id) < size:
            if self.endpoint.credit(stream_id) < 0:
                raise asyncio.CancelledError
            event = self.credit[stream_id]
            event.clear()
            await event.wait()
        await self.transport.call(lambda: self.endpoint.send_frame(frame_type, stream_id, memoryview(payload),
                                                                   framed=framed))
        self.connector.metrics.sent_bytes.inc(size)
