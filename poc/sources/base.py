"""The Source protocol: what a connector, the direct server and the SQL service need of a dataset, whatever it
is read from (a Parquet file held in memory, a database table or query read as it streams)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa


@dataclass(frozen=True)
class Described:
    """A dataset's schema, rows and IPC bytes (-1: unknown until read)."""

    schema: pa.Schema
    rows: int
    bytes: int


class Reader(Protocol):
    """A read of a dataset or a query's result, batch by batch: `run()` starts it (blocking; in a worker
    thread), `read()` gives the next batch or None at the end, `interrupt()` stops it from any thread,
    `close()` frees it. DuckDB's queries (poc.sql.engine) and databases' (poc.sources.database) have this
    shape, so one loop streams either with credit."""

    schema: pa.Schema

    def run(self) -> "Reader": ...

    def read(self) -> pa.RecordBatch | None: ...

    def interrupt(self, timed_out: bool = False) -> None: ...

    def close(self) -> None: ...


class Source(Protocol):
    """One named dataset.

    `held` sources are in memory: described at once, on any thread, and (as poc.sources.parquet's) they keep
    their batches framed for the tunnel and an Arrow object for the SQL engine. Others are read as they
    stream: `describe` may wait on the database, `reader()` streams with credit. `database` names the database
    a source lives in (SQL naming it is pushed down there), or is None (SQL runs in DuckDB at the connector).
    `fingerprint` names the exact data a held source serves, so that a stream cut off can be replayed from a row
    (docs/protocol.md §6a); None: its reads cannot be replayed (a database's rows may change between two)."""

    name: str
    held: bool
    database: object | None
    fingerprint: str | None

    def describe(self, timeout_s: float) -> Described: ...

    def reader(self) -> Reader: ...


SpecLoader = Callable[[str, dict, str, dict], Source]
