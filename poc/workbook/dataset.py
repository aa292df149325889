"""The seed's table: id int64, value string, amount float64, timestamp; deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("value", pa.string()),
    ("amount", pa.float64()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
])
_EPOCH_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z


def make_table(rows: int, seed: int = 42) -> pa.Table:
    """Build `rows` rows; the same seed gives the same table (about 50 bytes a row as Arrow IPC)."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**63 - 1, size=rows, dtype=np.int64)
    value = pa.array(np.char.add("value-", np.char.zfill(np.char.mod("%x", codes), 16)).astype(object), pa.string())
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64)),
        "value": value,
        "amount": pa.array(np.round(rng.uniform(0, 10_000, size=rows), 2)),
        "timestamp": pa.array(_EPOCH_US + np.sort(rng.integers(0, 365 * 86_400 * 10**6, size=rows)),
                              pa.timestamp("us", tz="UTC")),
    }, schema=SCHEMA)


def write_dataset(rows: int, out: str | Path, seed: int = 42) -> Path:
    """Write the table to a Parquet file, creating its folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(make_table(rows, seed), out)
    return out


def ensure_dataset(rows: int, out: str | Path, seed: int = 42) -> Path:
    """Reuse `out` if it already holds exactly this table's row count, else write it."""
    out = Path(out)
    if out.exists():
        try:
            if pq.ParquetFile(out).metadata.num_rows == rows:
                return out
        except (pa.ArrowInvalid, OSError):
            pass
    return write_dataset(rows, out, seed)


def dataset_folder(data_dir: str | Path, rows: int, seed: int = 42, name: str = "sales") -> Path:
    """A folder holding NAME.parquet of `rows` rows, made once and reused by later runs."""
    from ..config import project_path

    folder = project_path(data_dir) / f"rows-{rows}-seed-{seed}"
    ensure_dataset(rows, folder / f"{name}.parquet", seed)
    return folder
