"""What a connector serves, whichever of its links asks: its sources (poc.sources) and the SQL over them, and how
each request is answered — a flight_info, a dataset's stream, a query's result. The link itself (credit,
frames, compression) is the session's (poc.connector.session): `Link` below is all serving needs of it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from typing import Protocol

from .. import config
from ..catalog import fit_batch
from ..sources import Source
from ..sql.errors import SqlError
from ..tunnel import FrameType
from ..tunnel import events as ev
from ..tunnel.messages import clip
from .config import ConnectorConfig
from .metrics import ConnectorMetrics

log = logging.getLogger("poc.connector")

QUERY_THREADS = 8  # queries read at once (each holds a thread only while DuckDB produces its next batch)


class Link(Protocol):
    """What serving needs of the link a request came on (poc.connector.session.Session)."""

    def context(self, stream_id: int | None = None) -> dict: ...

    def max_frame(self) -> int: ...

    def resumable(self, stream_id: int, fingerprint: str) -> None: ...

    async def send(self, stream_id: int, frame_type: FrameType, payload=b"", framed: bytearray | None = None,
                   charge: int | None = None) -> None: ...

    async def compressed(self, dataset, max_frame: int, index: int) -> tuple[bytearray, int] | None: ...

    def end(self, stream_id: int) -> None: ...

    def open(self, stream_id: int) -> bool: ...

    async def fail(self, request_id: int, code: str, message: str) -> None: ...

    async def reply_info(self, request_id: int, schema: bytes, rows: int, size: int,
                         parameters: bytes | None = None) -> None: ...

    def reply_info_now(self, request_id: int, schema, rows: int, size: int) -> None: ...

    def fail_now(self, request_id: int, code: str, message: str) -> None: ...


class Serving:
    """The datasets of one connector, the SQL engine over the held ones (made at the first query), a connection
    budget per database (--db-connections) and the thread pool queries and checks run in."""

    def __init__(self, cfg: ConnectorConfig, sources: dict[str, Source], metrics: ConnectorMetrics) -> None:
        self.cfg = cfg
        self.sources = sources
        self.metrics = metrics
        self._engine = None
        self._engine_lock = asyncio.Lock()
        self._db_slots: dict[int, asyncio.Semaphore] = {}  # database → its --db-connections
        self.query_pool = concurrent.futures.ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="query")

    @property
    def names(self) -> list[str]:
        return sorted(self.sources)

    # -- SQL

    def _pushed(self, sql: str):
        """(database, rewritten query, its placeholders) when the query names database datasets, else None
        (DuckDB runs it): poc.sources.pushdown.route."""
        if not any(s.database is not None for s in self.sources.values()):
            return None  # nothing lives in a database: DuckDB's queries never load sqlglot
        from ..sources.pushdown import route

        return route(sql, self.sources)

    def database_slot(self, reader):
        """For a database's read, one of the --db-connections connections to that database (waiting for one if
        all are in use); for DuckDB's or a held dataset's, nothing."""
        database = getattr(reader, "database", None)
        if database is None:
            return contextlib.nullcontext()
        slots = self._db_slots.get(id(database))
        if slots is None:
            slots = self._db_slots[id(database)] = asyncio.Semaphore(self.cfg.db_connections)
        return slots

    async def open_query(self, sql: str, params: list | None = None):
        """A client's query with its values bound (poc.tunnel.params), not started: for its database or for
        DuckDB. Parsing and checking it runs in the query pool, off the event loop."""
        loop = asyncio.get_running_loop()
        pushed = await loop.run_in_executor(self.query_pool, self._pushed, sql)
        if pushed is not None:
            from ..sources.pushdown import pushed_query

            return pushed_query(pushed, self.cfg.query_timeout_s, params)
        engine = await self.sql_engine()
        return await loop.run_in_executor(self.query_pool, engine.open, sql, params)

    async def describer(self, sql: str, params: list | None = None):
        """A blocking function giving a client's query's result schema (with `params` bound, or before its
        values are known) and its parameters' schema, for the query pool."""
        pushed = await asyncio.get_running_loop().run_in_executor(self.query_pool, self._pushed, sql)
        if pushed is not None:
            from ..sources.database import describe

            return lambda: describe(*pushed, self.cfg.query_timeout_s, params)
        engine = await self.sql_engine()
        return lambda: engine.prepare(sql, params)

    async def sql_engine(self):
        """The DuckDB engine over the held datasets (their Parquet files; those built in memory as tables),
        made once, at the first query."""
        async with self._engine_lock:
            if self._engine is None:
                from ..sql.engine import SqlEngine

                held = {n: s for n, s in self.sources.items() if s.held}
                files = {n: s.path for n, s in held.items() if s.path is not None}
                tables = {n: s.dataset.table() for n, s in held.items() if s.path is None}
                self._engine = await asyncio.get_running_loop().run_in_executor(
                    self.query_pool, lambda: SqlEngine(files, tables, memory_limit_mb=self.cfg.query_memory_mb))
        return self._engine

    # -- flight_info and query_info

    def flight_info(self, link: Link, event: ev.FlightInfoRequested) -> asyncio.Future | None:
        """Answer a get_flight_info or query_info: a held dataset's at once (nothing to wait for: under load a
        round of the loop is most of its time); anything else in the query pool, as a task returned."""
        if event.sql is not None:
            self.metrics.requests.labels("query_info").inc()
            return asyncio.ensure_future(self._answer_query_info(link, event))
        self.metrics.requests.labels("get_flight_info").inc()
        log.info("get_flight_info %s", event.dataset, extra={**link.context(), "request_id": event.trace_id})
        source = self.sources.get(event.dataset)
        if source is None:
            link.fail_now(event.request_id, "not_found", f"dataset {event.dataset!r} not found")
        elif source.held:
            described = source.describe()
            link.reply_info_now(event.request_id, source.dataset.schema_message, described.rows, described.bytes)
        else:
            return asyncio.ensure_future(self._answer_schema(
                link, event, lambda: (source.describe(self.cfg.query_timeout_s).schema, None),
                f"get_flight_info {event.dataset} failed"))
        return None

    async def _answer_query_info(self, link: Link, event: ev.FlightInfoRequested) -> None:
        """The schema of a query's result (protocol 1.5 query_info), or the engine's reason to refuse it."""
        try:
            if not self.cfg.sql:
                raise SqlError("invalid_request", "this connector answers no SQL (--no-sql)")
            compute = await self.describer(event.sql, event.params)
        except SqlError as exc:
            await self._refused(link, event, "query_info refused", exc)
            return
        await self._answer_schema(link, event, compute, "query_info refused")

    async def _answer_schema(self, link: Link, event: ev.FlightInfoRequested, compute, failed: str) -> None:
        """Reply with the schemas `compute()` gives (run in the query pool: the result's, and a query's
        parameters' or None), rows and bytes -1; or with the engine's or database's reason it could not."""
        try:
            schema, parameters = await asyncio.get_running_loop().run_in_executor(self.query_pool, compute)
        except SqlError as exc:
            await self._refused(link, event, failed, exc)
            return
        await link.reply_info(event.request_id, schema.serialize().to_pybytes(), -1, -1,
                              None if parameters is None else parameters.serialize().to_pybytes())

    @staticmethod
    async def _refused(link: Link, event: ev.FlightInfoRequested, failed: str, exc: SqlError) -> None:
        log.info("%s (%s): %s", failed, exc.code, clip(str(exc), 300),
                 extra={**link.context(), "request_id": event.trace_id})
        await link.fail(event.request_id, exc.code, clip(str(exc)))

    # -- streams

    async def stream(self, link: Link, stream_id: int, name: str, sql: str | None = None,
                     params: list | None = None, from_row: int | None = None, fingerprint: str | None = None) -> None:
        """A do_get (resumed from a row, given one and its dataset's fingerprint) or a query (with its bound
        values), to its end; however it fails, it ends in an error frame, never in silence."""
        try:
            if sql is None:
                await self._stream_dataset(link, stream_id, name, from_row or 0, fingerprint)
            else:
                await self._stream_query(link, stream_id, sql, params)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except SqlError as exc:  # refused or failed by the engine: the client gets its message
            log.info("query failed (%s): %s", exc.code, clip(str(exc), 300), extra=link.context(stream_id))
            if link.open(stream_id):
                await link.fail(stream_id, exc.code, clip(str(exc)))
        except Exception as exc:  # a failed transfer must end in an error frame, never in silence
            log.exception("stream of %r failed", name or "a query", extra=link.context(stream_id))
            if link.open(stream_id):
                await link.fail(stream_id, "internal", clip(str(exc)))

    async def _stream_query(self, link: Link, stream_id: int, sql: str, params: list | None) -> None:
        """A client's query: in DuckDB over the held datasets, or in the database its datasets live in."""
        if not self.cfg.sql:
            raise SqlError("invalid_request", "this connector answers no SQL (--no-sql)")
        query = await self.open_query(sql, params)
        await self._stream_rows(link, stream_id, query, self.cfg.max_result_bytes)

    async def _stream_rows(self, link: Link, stream_id: int, reader, limit: int | None) -> None:
        """Run a reader (DuckDB's query or a database's: run, read, interrupt, close) and stream its result as it
        is produced: the next batch is read only once the last one had credit to go, so a slow client slows the
        query — the database's cursor too — and the connector holds about one batch and the stream's window.
        Past --query-timeout-s the query is interrupted; past `limit` result bytes the stream ends in an error
        (never a short result); a cancel interrupts it."""
        async with self.database_slot(reader):
            await self._stream_started(link, stream_id, reader, limit)

    async def _stream_started(self, link: Link, stream_id: int, reader, limit: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.queries.inc()
        timeout = getattr(reader, "timeout_s", self.cfg.query_timeout_s)
        timer = loop.call_later(timeout, reader.interrupt, True) if timeout else None
        sent = rows = 0
        try:
            await loop.run_in_executor(self.query_pool, reader.run)
            await link.send(stream_id, FrameType.SCHEMA, reader.schema.serialize())
            max_frame = link.max_frame()
            while (batch := await loop.run_in_executor(self.query_pool, reader.read)) is not None:
                for message in fit_batch(batch, max_frame):
                    sent += message.size
                    if limit is not None and sent > limit:
                        raise SqlError("result_too_large", f"the result passed the connector's --max-result-bytes "
                                                           f"{limit}: narrow the query (LIMIT, WHERE, fewer columns)")
                    await link.send(stream_id, FrameType.BATCH, message)
                rows += batch.num_rows
        except SqlError as exc:
            if exc.code == "timed_out":
                raise SqlError("timed_out", f"the query ran past --query-timeout-s {self.cfg.query_timeout_s:g} s") \
                    from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            reader.interrupt()  # a no-op at the end; stops the engine when the stream was cancelled or failed
            self.query_pool.submit(reader.close).add_done_callback(lambda _: self.metrics.queries.dec())
        link.end(stream_id)
        self.metrics.query_rows.inc(rows)
        log.info("result sent: %d rows, %d bytes", rows, sent, extra=link.context(stream_id))

    async def _stream_dataset(self, link: Link, stream_id: int, name: str, from_row: int = 0,
                              fingerprint: str | None = None) -> None:
        source = self.sources.get(name)
        if source is None:
            await link.fail(stream_id, "not_found", f"dataset {name!r} not found")
            return
        if fingerprint is not None and source.fingerprint != fingerprint:  # a resume (protocol §6a)
            log.info("stream of %r not resumed: its data changed (%s, now %s)", name, fingerprint,
                     source.fingerprint, extra=link.context(stream_id))
            await link.fail(stream_id, "unavailable", f"dataset {name!r} changed since its stream began: the stream "
                                                      "cannot resume; read it again")
            return
        if not source.held:  # read from where it lives as the stream has credit (no simulated delay: it is real)
            await self._stream_rows(link, stream_id, source.reader(), None)
            return
        ds = source.dataset
        if source.fingerprint is not None:
            link.resumable(stream_id, source.fingerprint)
        await asyncio.sleep(config.extraction_delay_s(self.cfg.delay_ms))  # simulated extraction
        await link.send(stream_id, FrameType.SCHEMA, ds.schema_message)
        max_frame = link.max_frame()
        if from_row:
            for framed in await asyncio.to_thread(ds.framed_from, from_row, max_frame):
                await link.send(stream_id, FrameType.BATCH, framed=framed)
            link.end(stream_id)
            log.info("stream of %r sent from row %d: %d rows", name, from_row, ds.rows - from_row,
                     extra=link.context(stream_id))
            return
        if ds.is_cut(max_frame):
            frames = ds.framed_messages(max_frame)
        else:  # a size not cut yet: slicing and serializing a large table takes a while
            frames = await asyncio.to_thread(ds.framed_messages, max_frame)
        for index, framed in enumerate(frames):
            compressed = await link.compressed(ds, max_frame, index)
            if compressed is None:
                await link.send(stream_id, FrameType.BATCH, framed=framed)
            else:
                await link.send(stream_id, FrameType.BATCH, framed=compressed[0], charge=compressed[1])
                self.metrics.compressed_batches.inc()
        link.end(stream_id)
        log.info("stream of %r sent: %d rows", name, ds.rows, extra=link.context(stream_id))
