"""Datasets read from Parquet and held in memory (poc.catalog), as Sources: `--data FILE|FOLDER`, or a sources
file's `{path: FILE}` entry."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..catalog import Dataset, load_datasets, load_file
from ..config import BATCH_BYTES, ConfigError
from .base import Described


class ParquetSource:
    """A held Source: the dataset's batches, framed once for the tunnel (`dataset`), described from memory."""

    held = True
    database = None

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.name = dataset.name

    @property
    def fingerprint(self) -> str | None:
        """The file's size, modification time and rows when it was read (docs/protocol.md §6a); None for a table
        built in memory."""
        return self.dataset.fingerprint

    @property
    def path(self) -> Path | None:
        """The Parquet file it was read from (the SQL engine scans it there), if any."""
        return self.dataset.path

    def describe(self, timeout_s: float = 0.0) -> Described:
        return Described(self.dataset.schema, self.dataset.rows, self.dataset.ipc_bytes)

    def reader(self) -> "HeldReader":
        return HeldReader(self.dataset)


class HeldReader:
    """A held dataset's batches as a Reader (poc.sources.base)."""

    def __init__(self, dataset: Dataset) -> None:
        self.schema = dataset.schema
        self._batches = iter(dataset.batches)

    def run(self) -> "HeldReader":
        return self

    def read(self) -> pa.RecordBatch | None:
        return next(self._batches, None)

    def interrupt(self, timed_out: bool = False) -> None:
        self._batches = iter(())

    def close(self) -> None:
        self._batches = iter(())


def from_spec(name: str, spec: dict, where: str, shared: dict) -> ParquetSource:
    """A sources file's `{path: FILE}` entry (relative to the sources file)."""
    if set(spec) != {"path"}:
        raise ConfigError(f"{where}: a path dataset has nothing but its path")
    file = (shared["file"].parent / str(spec["path"])).resolve()
    return ParquetSource(load_file(name, file, shared.get("batch_bytes", BATCH_BYTES)))


def load_folder(path: str | Path, batch_bytes: int = BATCH_BYTES) -> dict[str, ParquetSource]:
    """`--data`: a Parquet file, or every `*.parquet` of a folder, each a dataset named after its file stem."""
    return {name: ParquetSource(dataset) for name, dataset in load_datasets(path, batch_bytes).items()}
