"""Datasets loaded from Parquet and kept in memory, cut into batches that fit one frame."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import BATCH_BYTES, ConfigError
from .tunnel import ipc
from .tunnel.frames import HEADER
from .tunnel.messages import valid_dataset_name

log = logging.getLogger("poc.connector")


@dataclass
class Dataset:
    """One named table, as record batches of about `BATCH_BYTES` each.

    It is held once: each batch serialized behind 8 free bytes for the frame header (`framed_messages`), and
    the batches, their messages and `table()` are zero-copy views of those buffers. A frame size smaller than
    a batch's message (a slow link's, see the connector's frame_budget) adds one cut in frames of that size."""

    name: str
    schema: pa.Schema
    batches: list[pa.RecordBatch]
    path: Path | None = None  # the Parquet file it was read from: SQL queries scan it there (poc.sql.engine)
    fingerprint: str | None = None  # that file's size, modification time and rows when read (protocol §6a)

    @functools.cached_property
    def schema_message(self) -> pa.Buffer:
        """The Arrow IPC schema message (docs/protocol.md §4)."""
        return self.schema.serialize()

    def _primary(self) -> list[bytearray]:
        """Each batch message behind 8 free bytes, built once; the batches become views of them."""
        with _BUILDING:
            cache = self.__dict__.setdefault("_framed", {})
            if None not in cache:
                framed = []
                for i, batch in enumerate(self.batches):
                    framed.append(_framed(batch.serialize()))
                    self.batches[i] = pa.ipc.read_record_batch(_message_view(framed[-1]), self.schema)
                cache[None] = framed
            return cache[None]

    def seal(self) -> "Dataset":
        """Build the framed buffers now (at load) and give the memory the batches held back."""
        self._primary()
        pa.default_memory_pool().release_unused()
        return self

    @functools.cached_property
    def batch_messages(self) -> list[pa.Buffer]:
        """Each batch as one encapsulated Arrow IPC message: views of the framed buffers."""
        return [_message_view(f) for f in self._primary()]

    def messages_within(self, max_bytes: int) -> list[pa.Buffer]:
        """The batch messages, each batch halved until its message fits in `max_bytes` (a frame's limit)."""
        return [_message_view(f) for f in self.framed_messages(max_bytes)]

    def _fits(self, max_bytes: int) -> bool:
        return all(len(f) - HEADER.size <= max_bytes for f in self._primary())

    def framed_messages(self, max_bytes: int) -> list[bytearray]:
        """Each batch message behind 8 free bytes for the frame header (docs/protocol.md §4), each at most
        `max_bytes`: the connector writes the header in place and sends the buffer without another copy."""
        if self._fits(max_bytes):
            return self._primary()
        with _BUILDING:
            cache = self.__dict__["_framed"]
            if max_bytes not in cache:
                cache[max_bytes] = [_framed(m) for b in self.batches for m in _fit(b, max_bytes)]
            return cache[max_bytes]

    def framed_from(self, first_row: int, max_bytes: int) -> list[bytearray]:
        """The batch messages from row `first_row` on (a resumed stream, docs/protocol.md §6a), behind 8 free
        bytes, each at most `max_bytes`: serialized anew, not kept (a resume is rare; slow: run it in a thread)."""
        out, row = [], 0
        for batch in self.batches:
            end = row + batch.num_rows
            if end > first_row:
                out += [_framed(m) for m in _fit(batch.slice(max(0, first_row - row)), max_bytes)]
            row = end
        return out

    def compressed_frame(self, codec: str, max_bytes: int, index: int,
                         charge_limit: int | None = None) -> tuple[bytearray, int] | None:
        """Batch `index` of `framed_messages(max_bytes)` with its body compressed by `codec` (protocol §4b),
        behind 8 free bytes, and the credit it costs; None when compression does not pay for this batch
        (under 10 % smaller) or its charge would exceed `charge_limit` (the gateway's max_frame_bytes; by
        default `max_bytes`). Built on first use, then kept."""
        limit = max_bytes if charge_limit is None else charge_limit
        cache = self.__dict__.setdefault("_compressed", {}).setdefault((codec, max_bytes, limit), {})
        if index not in cache:
            raw = _message_view(self.framed_messages(max_bytes)[index])
            message = compress_message(raw, self.schema, codec)
            charge = ipc.charge(memoryview(message), codec)
            cache[index] = (_framed(message), charge) if message.size < 0.9 * raw.size and charge <= limit else None
        return cache[index]

    def is_cut(self, max_bytes: int, codec: str | None = None, index: int = 0, charge_limit: int = 0) -> bool:
        """Whether `framed_messages(max_bytes)` — or, with a codec, that batch's `compressed_frame` — is built
        already (building it takes a while: callers on an event loop do it in a thread)."""
        if codec is None:
            cuts = self.__dict__.get("_framed", {})
            return None in cuts and (max_bytes in cuts or self._fits(max_bytes))
        return index in self.__dict__.get("_compressed", {}).get((codec, max_bytes, charge_limit), {})

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    @functools.cached_property
    def ipc_bytes(self) -> int:
        """Bytes of the schema and batch messages as they cross the wire."""
        return self.schema_message.size + sum(m.size for m in self.batch_messages)

    def table(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, schema=self.schema)


def cut_batches(table: pa.Table, batch_bytes: int = BATCH_BYTES) -> list[pa.RecordBatch]:
    """Slice a table into batches of about `batch_bytes` (at least one row each)."""
    table = table.combine_chunks()
    if table.num_rows == 0:
        return []
    rows = max(1, int(batch_bytes * table.num_rows / max(1, table.nbytes)))
    return table.to_batches(max_chunksize=rows)


def load_datasets(path: str | Path, batch_bytes: int = BATCH_BYTES) -> dict[str, Dataset]:
    """Load a Parquet file, or every `*.parquet` file of a folder; a dataset's name is its file stem."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ConfigError(f"no *.parquet files in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"data path {path} does not exist")
    datasets = {}
    for file in files:
        if not valid_dataset_name(file.stem):
            message = f"{file.name}: {file.stem!r} is not a dataset name (1-128 of A-Z a-z 0-9 _ - .; docs/protocol.md §3a)"
            if len(files) == 1:
                raise ConfigError(message)
            log.warning("skipped %s", message)
            continue
        datasets[file.stem] = load_file(file.stem, file, batch_bytes)
    if not datasets:
        raise ConfigError(f"no Parquet file in {path} has a valid dataset name")
    return datasets


def load_file(name: str, file: Path, batch_bytes: int = BATCH_BYTES) -> Dataset:
    """One Parquet file as the dataset `name`, held once (Dataset.seal)."""
    try:
        stat = Path(file).stat()
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read Parquet file {file}: {exc}") from None
    fingerprint = f"{stat.st_size}-{stat.st_mtime_ns}-{table.num_rows}"
    schema, batches = table.schema, cut_batches(table, batch_bytes)
    del table  # the batches hold the data until seal() moves it into the framed buffers
    return Dataset(name, schema, batches, Path(file), fingerprint).seal()


def compress_message(message: pa.Buffer, schema: pa.Schema, codec: str) -> pa.Buffer:
    """One encapsulated record batch message, its body compressed with `codec` (Arrow IPC body compression)."""
    batch = pa.ipc.read_record_batch(pa.ipc.read_message(message), schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    reader.read_next_message()  # the schema
    return reader.read_next_message().serialize()


def available_codecs() -> list[str]:
    """The IPC body codecs this pyarrow build can write, best first (protocol §4b)."""
    return [c for c in ("zstd", "lz4") if pa.Codec.is_available(c)]


_BUILDING = threading.RLock()  # framed buffers are built once, by whichever thread asks first


def _message_view(framed: bytearray) -> pa.Buffer:
    """The IPC message of a framed buffer, without a copy."""
    return pa.py_buffer(framed).slice(HEADER.size)


def _framed(message: pa.Buffer) -> bytearray:
    out = bytearray(HEADER.size + message.size)
    out[HEADER.size:] = memoryview(message)
    return out


def fit_batch(batch: pa.RecordBatch, max_bytes: int) -> list[pa.Buffer]:
    """A batch as IPC messages of at most `max_bytes` each: halved until each fits."""
    return _fit(batch, max_bytes)


def _fit(batch: pa.RecordBatch, max_bytes: int) -> list[pa.Buffer]:
    message = batch.serialize()
    if message.size <= max_bytes:
        return [message]
    if batch.num_rows <= 1:
        raise ValueError(f"one row serializes to {message.size} bytes, more than a frame may carry ({max_bytes})")
    half = batch.num_rows // 2
    return _fit(batch.slice(0, half), max_bytes) + _fit(batch.slice(half), max_bytes)
