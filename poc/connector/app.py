"""The connector process: one outbound WebSocket, datasets from Parquet, reconnect with backoff."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import random
import hashlib
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import grpc.aio
from picows import WSError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from .. import config
from ..catalog import Dataset, fit_batch
from ..transports.base import TunnelTransport, keep_unsent_small
from ..transports.websocket import WebSocketLink
from ..tunnel import CloseCode, ConnectorEndpoint, FrameType, TunnelClosed
from ..tunnel import events as ev
from ..tunnel.messages import clip
from .metrics import ConnectorMetrics

log = logging.getLogger("poc.connector")


COMPRESS_MIN_RTT_S = 0.002  # --compression auto: links with a shorter round trip are local, never compressed
FRAME_BUDGET_S = 0.02  # a frame should take no longer than this to leave: a control message waits for one
MIN_FRAME_BYTES = 64 * 1024
QUERY_THREADS = 8  # queries read at once (each holds a thread only while DuckDB produces its next batch)


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


class RegistrationRefused(Exception):
    """The gateway refused the registration (bad token, bad version): retrying would not help."""


class RefusedForNow(Exception):
    """The gateway refused the registration for a reason that may pass (the tenant holds as many tunnels there
    as it allows: code too_many_links, close 4008): back off and retry."""


RETRY_LATER = {"too_many_links"}  # registration refusals a later attempt may cure (protocol.md §9)


class Replaced(Exception):
    """A newer connector registered for this tenant (close 4002): reconnecting would only fight it."""


@dataclass
class ConnectorConfig:
    gateway: str  # the first (or only) gateway
    tenant_id: str
    token: str
    delay_ms: tuple[float, float] = config.DELAY_MS
    heartbeat_s: float = config.HEARTBEAT_S
    backoff_initial_s: float = config.BACKOFF_INITIAL_S
    backoff_max_s: float = config.BACKOFF_MAX_S
    ca_file: str | None = None
    ws_impl: str = config.WS_IMPL
    more_gateways: tuple[str, ...] = ()  # replicas of the same service (--gateway given several times)
    tunnels: int = 1  # live tunnels kept at once, each to a different gateway while there are enough
    connector_id: str = ""  # "": one derived from this host and tenant (default_connector_id)
    compression: str = "auto"  # auto | always | off (--compression)
    compress_below_mbps: float = config.COMPRESS_BELOW_MBPS
    sql: bool = True  # answer SQL queries (protocol 1.5) over the datasets (--no-sql: off)
    max_result_bytes: int = config.MAX_RESULT_BYTES
    query_timeout_s: float = config.QUERY_TIMEOUT_S
    query_memory_mb: int = config.QUERY_MEMORY_MB
    db_connections: int = config.DB_CONNECTIONS  # per database (--sources): more requests wait for one

    @property
    def sql_dialect(self) -> str | None:
        """What register says about SQL (protocol 1.5): "duckdb" when queries are answered, else None."""
        import importlib.util

        return "duckdb" if self.sql and importlib.util.find_spec("duckdb") is not None else None

    @property
    def codecs(self) -> list[str]:
        """What register offers (protocol 1.4): the codecs pyarrow can write, none with --compression off."""
        from ..catalog import available_codecs

        return [] if self.compression == "off" else available_codecs()

    def __post_init__(self) -> None:
        self.connector_id = self.connector_id or default_connector_id(self.tenant_id)

    @property
    def gateways(self) -> list[str]:
        return [self.gateway, *(g for g in self.more_gateways if g != self.gateway)]

    def __repr__(self) -> str:  # the token never reaches logs
        return f"ConnectorConfig(gateways={self.gateways!r}, tenant_id={self.tenant_id!r}, tunnels={self.tunnels})"


def default_connector_id(tenant_id: str) -> str:
    """Stable for one tenant on one host: a connector restarted there replaces its own old links (which may
    still look alive to the gateway), while connectors of the tenant on other hosts add theirs."""
    digest = hashlib.sha256(f"{socket.gethostname()}\0{tenant_id}".encode()).hexdigest()
    return f"h-{digest[:16]}"


def names_several(url: str) -> bool:
    """Whether a ws[s]:// URL's host name resolves to several addresses (several replicas behind one name)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        return False
    try:
        return len({info[4][0] for info in socket.getaddrinfo(parsed.hostname, parsed.port or 443,
                                                             type=socket.SOCK_STREAM)}) > 1
    except OSError:
        return False


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so returning connectors spread out."""
    base = min(cap, initial * 2 ** attempt)
    return base / 2 + rng.uniform(0, base / 2)


class Connector:
    """Keeps `cfg.tunnels` registered tunnels ("slots"), each to a different gateway of `cfg.gateways` while
    there are enough, all with one connector_id; each slot reconnects with backoff, moving on to the next
    gateway. A goaway retires a slot once its link closes and starts a new one to another gateway at once."""

    def __init__(self, cfg: ConnectorConfig, datasets: dict[str, Dataset], sources: dict | None = None) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.sources = sources or {}  # name → DatabaseDataset (--sources: read from a database through ADBC)
        self.session_id: str | None = None  # of the newest registration
        self.on_registered = None
        self.metrics = ConnectorMetrics()
        self._registered: set[int] = set()  # slots registered on a live link right now
        self._in_use: dict[int, str] = {}  # slot → the gateway it dials or holds
        self._leaving: set[str] = set()  # gateways that sent goaway on a link still open
        self._slots: dict[int, asyncio.Task] = {}
        self._positions: dict[int, int] = {}  # slot → its position, the smallest free: part of its connector_id
        self._retiring: set[asyncio.Task] = set()
        self._first: dict[int, str] = {}  # slot → the gateway a goaway suggested for its first attempt
        self._replacing: dict[int, "_Session"] = {}  # slot → the session it takes over from
        self._next_slot = itertools.count()
        self._offset = random.random()  # connectors given the same gateways spread over them
        self._engine = None  # the SQL engine, made at the first query (`sql_engine`)
        self._db_slots: dict[int, asyncio.Semaphore] = {}  # database → its --db-connections
        self._engine_lock = asyncio.Lock()
        self.query_pool = concurrent.futures.ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="query")

    @property
    def names(self) -> list[str]:
        """Every dataset this connector serves: Parquet ones and database ones."""
        return sorted({*self.datasets, *self.sources})

    def _pushed(self, sql: str):
        """(database, rewritten query) when the query names database datasets, else None (DuckDB runs it)."""
        if not self.sources:
            return None
        from ..sources import involves, pushdown

        if not involves(sql, self.sources):
            return None
        return pushdown(sql, self.sources, set(self.datasets))

    def database_slot(self, query):
        """For a database's query, one of the --db-connections connections to that database (waiting for one
        if all are in use); for DuckDB's, nothing."""
        database = getattr(query, "database", None)
        if database is None:
            return contextlib.nullcontext()
        slots = self._db_slots.get(id(database))
        if slots is None:
            slots = self._db_slots[id(database)] = asyncio.Semaphore(self.cfg.db_connections)
        return slots

    async def open_query(self, sql: str):
        """A client's query, not started: for its database (poc.sources) or for DuckDB. Parsing and checking
        it runs in the query pool, off the event loop."""
        pushed = await asyncio.get_running_loop().run_in_executor(self.query_pool, self._pushed, sql)
        if pushed is not None:
            from ..sources import DatabaseQuery

            return DatabaseQuery(*pushed, self.cfg.query_timeout_s)
        engine = await self.sql_engine()
        return await asyncio.get_running_loop().run_in_executor(self.query_pool, engine.open, sql)

    async def describer(self, sql: str):
        """A blocking function giving a client's query's result schema, for the query pool."""
        pushed = await asyncio.get_running_loop().run_in_executor(self.query_pool, self._pushed, sql)
        if pushed is not None:
            from ..sources import describe

            return lambda: describe(*pushed, self.cfg.query_timeout_s)
        engine = await self.sql_engine()
        return lambda: engine.schema(sql)

    async def sql_engine(self):
        """The DuckDB engine over the datasets (their Parquet files; those built in memory are copied in),
        made once, at the first query."""
        async with self._engine_lock:
            if self._engine is None:
                from ..sql.engine import SqlEngine

                files = {n: ds.path for n, ds in self.datasets.items() if ds.path is not None}
                tables = {n: ds.table() for n, ds in self.datasets.items() if ds.path is None}
                self._engine = await asyncio.get_running_loop().run_in_executor(
                    self.query_pool, lambda: SqlEngine(files, tables, memory_limit_mb=self.cfg.query_memory_mb))
        return self._engine

    @property
    def online(self) -> bool:
        """Registered on at least one live link right now."""
        return bool(self._registered)

    @property
    def live_tunnels(self) -> int:
        return len(self._registered)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the tunnels until `stop` is set; raise RegistrationRefused (or Replaced) when a gateway says
        retrying cannot help."""
        for _ in range(max(1, self.cfg.tunnels)):
            self._start_slot(stop)
        try:
            while self._slots:
                done, _ = await asyncio.wait(set(self._slots.values()), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
        finally:
            for task in self._slots.values():
                task.cancel()
            await asyncio.gather(*self._slots.values(), return_exceptions=True)

    def _start_slot(self, stop: asyncio.Event, first: str | None = None,
                    replaces: "_Session | None" = None) -> None:
        """A new tunnel; `first`: the gateway to try first; `replaces`: a session that said goaway, closed
        by this side once the new tunnel is registered and its own streams have ended."""
        slot = next(self._next_slot)
        if first is not None:
            self._first[slot] = first
        if replaces is not None:
            self._replacing[slot] = replaces
        taken = set(self._positions.values())
        self._positions[slot] = next(p for p in itertools.count() if p not in taken)
        task = asyncio.get_running_loop().create_task(self._slot(slot, stop))
        self._slots[slot] = task
        task.add_done_callback(lambda t, slot=slot: self._slot_ended(slot, t))

    def _slot_ended(self, slot: int, task: asyncio.Task) -> None:
        self._positions.pop(slot, None)
        if task.cancelled() or task.exception() is None:
            self._slots.pop(slot, None)  # retired (goaway) or stopped; a failed slot stays for run() to raise

    def registration_id(self, slot: int) -> str:
        """The connector_id a slot registers with: the connector's id and the slot's position, so that each
        of its tunnels is distinct even when two land on one gateway (behind a load balancer), and a
        restarted connector's tunnel replaces the one it had at that position (protocol.md §2)."""
        return f"{self.cfg.connector_id}/{self._positions.get(slot, 0)}"

    async def targets(self) -> list[str]:
        """Where a link may go, resolved now: each --gateway URL, or, for a ws[s]:// URL whose name resolves to
        several addresses (one name for several replicas), one target per address, written URL#ADDRESS (the
        link keeps the name for TLS and the Host header and connects to that address)."""
        found: list[str] = []
        loop = asyncio.get_running_loop()
        for url in self.cfg.gateways:
            parsed = urllib.parse.urlsplit(url)
            addresses: list[str] = []
            if parsed.scheme in ("ws", "wss") and parsed.hostname:
                try:
                    infos = await loop.getaddrinfo(parsed.hostname, parsed.port or 443, type=socket.SOCK_STREAM)
                    addresses = list(dict.fromkeys(info[4][0] for info in infos))
                except OSError:
                    pass  # the dial says why
            found += [f"{url}#{address}" for address in addresses] if len(addresses) > 1 else [url]
        return found

    def _choose(self, slot: int, attempt: int, gateways: list[str]) -> str:
        """The gateway for a slot's next link: one no other slot uses and that did not say goaway, in turn."""
        taken = {url for other, url in self._in_use.items() if other != slot} | self._leaving
        free = [url for url in gateways if url not in taken] or [url for url in gateways
                                                                  if url not in self._leaving] or gateways
        return free[(int(self._offset * len(free)) + slot + attempt) % len(free)]

    async def _slot(self, slot: int, stop: asyncio.Event) -> None:
        """One tunnel: connect, serve, reconnect with backoff (to the next gateway); return once retired."""
        attempt = 0
        while not stop.is_set():
            url = self._in_use[slot] = self._first.pop(slot, None) or self._choose(slot, attempt,
                                                                                   await self.targets())
            session: _Session | None = None
            try:
                session = await self._session(stop, url, slot)
            except RegistrationRefused:
                raise
            except _Ended as ended:
                session = ended.session
                self._link_lost(url, ended.__cause__)
            except Exception as exc:
                self._link_lost(url, exc)
            finally:
                self._registered.discard(slot)
                self.metrics.registered.set(len(self._registered))
                if session is not None and session.goaway:
                    self._leaving.discard(url)
            if stop.is_set():
                return
            if session is not None and session.goaway:
                self._in_use.pop(slot, None)
                log.info("link to %s closed after its goaway; its replacement took over", url)
                return
            self.metrics.reconnects.inc()
            attempt = 0 if session is not None and session.registered else attempt + 1
            delay = backoff_delay(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
            log.info("reconnecting in %.2f s (attempt %d)", delay, attempt + 1)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _link_lost(self, url: str, exc: BaseException | None) -> None:
        """Log why a link ended; raise what retrying cannot cure."""
        if isinstance(exc, TunnelClosed):
            if exc.code == CloseCode.REPLACED:
                raise Replaced(f"gateway closed the link: {exc.reason}") from None
            if exc.code == CloseCode.TENANT_REMOVED:
                raise RegistrationRefused(f"gateway closed the link: {exc.reason}") from None
            log.warning("link to %s lost: %s", url, exc)
        elif isinstance(exc, (OSError, InvalidHandshake, asyncio.TimeoutError, WSError, grpc.aio.AioRpcError,
                              RefusedForNow)):
            log.warning("link to %s lost: %s", url, exc or type(exc).__name__)
        elif exc is not None:  # whatever else ended the session, a new link may cure it: reconnect, never exit
            log.error("session with %s failed", url, exc_info=exc)

    def _on_goaway(self, session: "_Session", reason: str, prefer: str | None) -> None:
        """A gateway asks this link to move (it drains, or holds more than its share): start a tunnel to
        another gateway now — the one it suggests if this connector was given it — and close this link once
        that one is registered and this link's streams have ended."""
        log.info("gateway %s says goaway (%s): opening a tunnel to %s", session.url, reason,
                 prefer if prefer in self.cfg.gateways else "another gateway")
        usable = prefer in self.cfg.gateways and prefer not in self._in_use.values()  # not where a tunnel is
        if prefer is not None and not usable and all(g == session.url for g in self.cfg.gateways):
            log.info("staying on %s: it asked this link to move, but it is the only gateway this connector "
                     "knows", session.url)
            session.goaway = False  # a rebalancing request this connector cannot follow; drains close the link
            return
        self._leaving.add(session.url)
        self._start_slot(session.stop, prefer if usable else None, replaces=session)

    def _took_over(self, slot: int) -> None:
        """A slot registered: retire the session it replaces, if any."""
        old = self._replacing.pop(slot, None)
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.retire())
            self._retiring.add(task)  # held until done: a task nothing refers to may be collected
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _socket_to(url: str, address: str) -> socket.socket:
        """A TCP socket connected to `address` at the URL's port."""
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or (443 if parsed.scheme == "wss" else 80)
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), 10)
        except BaseException:
            sock.close()
            raise
        return sock

    def _ssl_context(self, url: str) -> ssl.SSLContext | None:
        if not url.startswith("wss://"):
            return None
        return ssl.create_default_context(cafile=self.cfg.ca_file)

    @contextlib.asynccontextmanager
    async def _dial(self, target: str):
        """The link to a gateway; the URL's scheme picks gRPC or WebSocket, --ws-impl the WebSocket library;
        a target URL#ADDRESS connects to that address."""
        cfg = self.cfg
        url, _, address = target.partition("#")
        sock = await self._socket_to(url, address) if address else None
        if url.startswith(("ws://", "wss://")) and cfg.ws_impl == "websockets":
            async with connect(url, compression=None, proxy=None, ssl=self._ssl_context(url), sock=sock,
                               max_size=config.MAX_FRAME_BYTES, ping_interval=cfg.heartbeat_s,
                               ping_timeout=cfg.heartbeat_s, write_limit=1024 * 1024, open_timeout=10) as ws:
                keep_unsent_small(ws.transport.get_extra_info("socket"))
                yield WebSocketLink(ws, ConnectorEndpoint())
            return
        if url.startswith(("grpc://", "grpcs://")):
            from ..transports.grpc_tunnel import dial_grpc

            ca = open(cfg.ca_file, "rb").read() if cfg.ca_file else None
            link = await dial_grpc(url.split("://", 1)[1].rstrip("/"), ConnectorEndpoint, ca,
                                   url.startswith("grpcs://"), cfg.heartbeat_s, config.MAX_FRAME_BYTES)
        else:
            from ..transports.picows_ws import dial_picows

            link = await dial_picows(url, ConnectorEndpoint, self._ssl_context(url), cfg.heartbeat_s,
                                     config.MAX_FRAME_BYTES, sock)
        try:
            yield link
        finally:
            if link.closed is None:
                await link.close(CloseCode.GOING_AWAY, "connector shutting down")

    async def _session(self, stop: asyncio.Event, url: str, slot: int) -> "_Session":
        """One link from dial to close; returns its session when the link ended cleanly, else raises _Ended
        (carrying the session and, as its cause, what ended it) or what the dial raised."""
        cfg = self.cfg
        async with self._dial(url) as transport:
            endpoint = transport.endpoint
            await transport.call(endpoint.register, cfg.tenant_id, cfg.token, self.names,
                                 self.registration_id(slot), cfg.codecs, cfg.sql_dialect)
            session = _Session(self, transport, url, slot, stop)
            stopper = asyncio.get_running_loop().create_task(self._close_on(stop, transport))
            try:
                await session.serve()
            except RegistrationRefused:
                raise
            except Exception as exc:
                raise _Ended(session) from exc
            finally:
                stopper.cancel()
        return session

    @staticmethod
    async def _close_on(stop: asyncio.Event, transport: TunnelTransport) -> None:
        await stop.wait()
        await transport.close(1001, "connector shutting down")


class _Ended(Exception):
    """A session's link ended with an error (its cause); carries the session."""

    def __init__(self, session: "_Session") -> None:
        super().__init__()
        self.session = session


class _Session:
    """One registered link: answers requests and runs one task per stream."""

    def __init__(self, connector: Connector, transport: TunnelTransport, url: str = "", slot: int = 0,
                 stop: asyncio.Event | None = None) -> None:
        self.connector = connector
        self.transport = transport
        self.url = url
        self.slot = slot
        self.stop = stop or asyncio.Event()
        self.goaway = False  # the gateway said goaway on this link
        self.registered = False
        self.endpoint: ConnectorEndpoint = transport.endpoint
        self.tasks: dict[int, asyncio.Task] = {}
        self.info_tasks: set[asyncio.Task] = set()  # query_info answers being worked out
        self.credit: dict[int, asyncio.Event] = {}
        self.traces: dict[int, str | None] = {}  # stream → the Flight call's request id, for log lines
        self.compressed = False  # --compression auto: whether batches go compressed on this link now
        self.rtt_s: float | None = None  # the smallest heartbeat round trip seen on this link

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
            await events.aclose()

    def _on_registration(self, event: ev.Event) -> None:
        if isinstance(event, ev.RegistrationRefused):
            refused = RefusedForNow if event.code in RETRY_LATER else RegistrationRefused
            raise refused(f"gateway refused the registration ({event.code}): {event.message}")
        connector = self.connector
        connector.session_id = event.registered.session_id
        self.registered = True
        connector._registered.add(self.slot)
        connector.metrics.registered.set(len(connector._registered))
        log.info("registered tenant %s as session %s at %s", connector.cfg.tenant_id, connector.session_id,
                 self.url or connector.cfg.gateway)
        connector._took_over(self.slot)
        if connector.on_registered:
            connector.on_registered(connector.session_id)

    def _handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamRequested):
            self.connector.metrics.requests.labels("do_get").inc()
            self.connector.metrics.streams.inc()
            self.traces[event.stream_id] = event.trace_id
            if event.sql is None:
                log.info("do_get %s", event.dataset, extra=self._context(event.stream_id))
            else:
                log.info("query %s", clip(" ".join(event.sql.split()), 200), extra=self._context(event.stream_id))
            self.credit[event.stream_id] = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._stream(event.stream_id, event.dataset, event.sql))
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
        elif isinstance(event, ev.FlightInfoRequested) and event.sql is not None:
            self.connector.metrics.requests.labels("query_info").inc()
            self._spawn_info(self._answer_query_info(event))
        elif isinstance(event, ev.FlightInfoRequested):
            self.connector.metrics.requests.labels("get_flight_info").inc()
            log.info("get_flight_info %s", event.dataset, extra={**self._context(), "request_id": event.trace_id})
            if event.dataset in self.connector.sources:
                self._spawn_info(self._answer_table_info(event))
            else:
                self._answer_flight_info(event)
        elif isinstance(event, ev.GoAwayReceived):
            if not self.goaway:
                self.goaway = True
                self.connector._on_goaway(self, event.reason, event.prefer)
        elif isinstance(event, ev.HeartbeatAcked):
            rtt = max(0.0, time.time() - event.ts)
            self.rtt_s = rtt if self.rtt_s is None else min(self.rtt_s, rtt)
        elif isinstance(event, ev.RequestFailed):
            log.warning("gateway reported an error (%s): %s", event.code, event.message)
        elif isinstance(event, ev.RequestRefused):  # answered with an error for that request; the link goes on
            log.warning("refused request %d of the gateway: %s", event.request_id, event.reason,
                        extra=self._context())

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
        """At the gateway's interval (§10), or this connector's own when that is shorter; the first at once,
        so that the link's round trip is known from the start (its ack: `rtt_s`)."""
        interval = min(self.connector.cfg.heartbeat_s, self.endpoint.registered.heartbeat_s)
        while True:
            await self.transport.call(self.endpoint.heartbeat, time.time())
            await asyncio.sleep(interval)

    async def _stream(self, stream_id: int, name: str, sql: str | None = None) -> None:
        from ..sql.engine import SqlError

        try:
            if sql is None:
                await self._stream_dataset(stream_id, name)
            else:
                await self._stream_query(stream_id, sql)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except SqlError as exc:  # refused or failed by the engine: the client gets its message
            log.info("query failed (%s): %s", exc.code, clip(str(exc), 300), extra=self._context(stream_id))
            if self.endpoint.credit(stream_id) >= 0:
                await self.transport.call(self.endpoint.fail_request, stream_id, exc.code, clip(str(exc)))
        except Exception as exc:  # a failed transfer must end in an error frame, never in silence
            log.exception("stream of %r failed", name or "a query", extra=self._context(stream_id))
            if self.endpoint.credit(stream_id) >= 0:
                await self.transport.call(self.endpoint.fail_request, stream_id, "internal", clip(str(exc)))

    def _spawn_info(self, answer) -> None:
        """Work out a flight_info answer in a task of this session (cancelled with it)."""
        task = asyncio.get_running_loop().create_task(answer)
        self.info_tasks.add(task)
        task.add_done_callback(self.info_tasks.discard)

    async def _answer_query_info(self, event: ev.FlightInfoRequested) -> None:
        """The schema of a query's result (protocol 1.5 query_info), or the engine's reason to refuse it."""
        from ..sql.engine import SqlError

        async def schema():
            if not self.connector.cfg.sql:
                raise SqlError("invalid_request", "this connector answers no SQL (--no-sql)")
            return await self.connector.describer(event.sql)
        await self._answer_schema(event, schema, "query_info refused")

    async def _answer_table_info(self, event: ev.FlightInfoRequested) -> None:
        """A database dataset's flight_info: its schema from the database's catalogue (no rows read); rows and
        bytes unknown (-1), as Flight allows."""
        table = self.connector.sources[event.dataset]

        async def schema():
            return lambda: table.schema(self.connector.cfg.query_timeout_s)
        await self._answer_schema(event, schema, f"get_flight_info {event.dataset} failed")

    async def _answer_schema(self, event: ev.FlightInfoRequested, blocking, failed: str) -> None:
        """Reply with the schema `await blocking()` returns a function for (run in the query pool), rows and bytes
        -1; or with the engine's or database's reason it could not."""
        from ..sql.engine import SqlError

        try:
            compute = await blocking()
            schema = await asyncio.get_running_loop().run_in_executor(self.connector.query_pool, compute)
        except SqlError as exc:
            log.info("%s (%s): %s", failed, exc.code, clip(str(exc), 300),
                     extra={**self._context(), "request_id": event.trace_id})
            await self.transport.call(self.endpoint.fail_request, event.request_id, exc.code, clip(str(exc)))
            return
        await self.transport.call(self.endpoint.reply_flight_info, event.request_id,
                                  schema.serialize().to_pybytes(), -1, -1)

    async def _stream_query(self, stream_id: int, sql: str) -> None:
        """A client's query: in DuckDB over the Parquet datasets, or in the database its datasets live in."""
        from ..sql.engine import SqlError

        if not self.connector.cfg.sql:
            raise SqlError("invalid_request", "this connector answers no SQL (--no-sql)")
        query = await self.connector.open_query(sql)
        await self._stream_rows(stream_id, query, self.connector.cfg.max_result_bytes)

    async def _stream_rows(self, stream_id: int, query, limit: int | None) -> None:
        """Run a query (DuckDB's or a database's: run, read, interrupt, close) and stream its result as it is
        produced: the next batch is read only once the last one had credit to go, so a slow client slows the
        query — the database's cursor too — and the connector holds about one batch and the stream's window.
        Past --query-timeout-s the query is interrupted; past `limit` result bytes the stream ends in an error
        (never a short result); a cancel interrupts it."""
        async with self.connector.database_slot(query):
            await self._stream_started(stream_id, query, limit)

    async def _stream_started(self, stream_id: int, query, limit: int | None) -> None:
        from ..sql.engine import SqlError

        connector, cfg, loop = self.connector, self.connector.cfg, asyncio.get_running_loop()
        connector.metrics.queries.inc()
        timeout = getattr(query, "timeout_s", cfg.query_timeout_s)
        timer = loop.call_later(timeout, query.interrupt, True) if timeout else None
        sent = rows = 0
        try:
            await loop.run_in_executor(connector.query_pool, query.run)
            await self._send(stream_id, FrameType.SCHEMA, query.schema.serialize())
            max_frame = frame_budget(self.transport.drain_bps, self.endpoint.registered.max_frame_bytes)
            while (batch := await loop.run_in_executor(connector.query_pool, query.read)) is not None:
                for message in fit_batch(batch, max_frame):
                    sent += message.size
                    if limit is not None and sent > limit:
                        raise SqlError("result_too_large", f"the result passed the connector's --max-result-bytes "
                                                           f"{limit}: narrow the query (LIMIT, WHERE, fewer columns)")
                    await self._send(stream_id, FrameType.BATCH, message)
                rows += batch.num_rows
        except SqlError as exc:
            if exc.code == "timed_out":
                raise SqlError("timed_out", f"the query ran past --query-timeout-s {cfg.query_timeout_s:g} s") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            query.interrupt()  # a no-op at the end; stops the engine when the stream was cancelled or failed
            connector.query_pool.submit(query.close).add_done_callback(lambda _: connector.metrics.queries.dec())
        self.endpoint.send_frame(FrameType.END, stream_id)
        self.transport.flush_soon()
        connector.metrics.query_rows.inc(rows)
        log.info("result sent: %d rows, %d bytes", rows, sent, extra=self._context(stream_id))

    async def _stream_dataset(self, stream_id: int, name: str) -> None:
        table = self.connector.sources.get(name)
        if table is not None:  # read from its database as the stream has credit (no simulated delay: it is real)
            from ..sources import table_query

            await self._stream_rows(stream_id, table_query(table), None)
            return
        ds = self.connector.datasets.get(name)
        if ds is None:
            await self.transport.call(self.endpoint.fail_request, stream_id, "not_found", f"dataset {name!r} not found")
            return
        await asyncio.sleep(config.extraction_delay_s(self.connector.cfg.delay_ms))  # simulated extraction
        await self._send(stream_id, FrameType.SCHEMA, ds.schema_message)
        max_frame = frame_budget(self.transport.drain_bps, self.endpoint.registered.max_frame_bytes)
        if ds.is_cut(max_frame):
            frames = ds.framed_messages(max_frame)
        else:  # a size not cut yet: slicing and serializing a large table takes a while
            frames = await asyncio.to_thread(ds.framed_messages, max_frame)
        for index, framed in enumerate(frames):
            compressed = await self._compressed(ds, max_frame, index)
            if compressed is None:
                await self._send(stream_id, FrameType.BATCH, framed=framed)
            else:
                await self._send(stream_id, FrameType.BATCH, framed=compressed[0], charge=compressed[1])
                self.connector.metrics.compressed_batches.inc()
        self.endpoint.send_frame(FrameType.END, stream_id)
        self.transport.flush_soon()
        log.info("stream of %r sent: %d rows", name, ds.rows, extra=self._context(stream_id))

    def compressing(self) -> bool:
        """Whether the next batch goes compressed: a codec was agreed (protocol §4b) and --compression says
        always, or auto and the link is a slow wide-area one: its heartbeat round trip is at least
        COMPRESS_MIN_RTT_S and it drains slower than --compress-below-mbps. Decompressing costs the gateway
        CPU, which only a slow link repays; a link inside one site that drains slowly does so because the
        gateway is busy, and compressing would slow it further (docs/results.md)."""
        cfg = self.connector.cfg
        if self.endpoint.codec is None or cfg.compression == "off":
            return False
        if cfg.compression == "always":
            return True
        rate = self.transport.drain_bps
        slow = (rate is not None and rate * 8 / 1e6 < cfg.compress_below_mbps
                and self.rtt_s is not None and self.rtt_s >= COMPRESS_MIN_RTT_S)
        if slow != self.compressed:
            self.compressed = slow
            log.info("link drains at %.0f Mbit/s: batches go %s", (rate or 0) * 8 / 1e6,
                     f"compressed ({self.endpoint.codec})" if slow else "uncompressed", extra=self._context())
        return slow

    async def _compressed(self, ds: Dataset, max_frame: int, index: int) -> tuple[bytearray, int] | None:
        """The batch compressed with the link's codec when compressing pays now, else None. The first request
        for a batch compresses it in a thread (pyarrow lets the event loop run meanwhile); later ones reuse it."""
        if not self.compressing():
            return None
        codec, limit = self.endpoint.codec, self.endpoint.registered.max_frame_bytes  # a charge fits a frame
        if ds.is_cut(max_frame, codec, index, limit):
            return ds.compressed_frame(codec, max_frame, index, limit)
        return await asyncio.to_thread(ds.compressed_frame, codec, max_frame, index, limit)

    async def _send(self, stream_id: int, frame_type: FrameType, payload=b"", framed: bytearray | None = None,
                    charge: int | None = None) -> None:
        """Queue one frame once the stream has credit for it (docs/protocol.md §5); the link's writer sends it
        in the stream's turn. A `framed` buffer is shared by every stream of the dataset, on every link: the
        writer writes its header as it hands it to the socket (poc.tunnel.endpoint)."""
        size = len(framed) - 8 if framed is not None else len(payload)
        cost = size if charge is None else charge
        if 0 <= self.endpoint.credit(stream_id) < cost:
            self.connector.metrics.credit_waits.inc()
        while self.endpoint.credit(stream_id) < cost:
            if self.endpoint.credit(stream_id) < 0:
                raise asyncio.CancelledError
            event = self.credit[stream_id]
            event.clear()
            await event.wait()
        self.endpoint.send_frame(frame_type, stream_id, memoryview(payload), framed=framed, charge=charge)
        self.transport.flush_soon()
        self.connector.metrics.sent_bytes.inc(size)
