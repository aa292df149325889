"""Where datasets come from. One protocol (poc.sources.base: `Source`, `Reader`), its kinds, and the sources file
that names them (`--sources FILE`):

    datasets:
      sales:  {url: "postgresql://reader@127.0.0.1:5432/shop", table: public.sales}
      recent: {url: "postgresql://reader@127.0.0.1:5432/shop", query: "SELECT * FROM sales WHERE day > now() - interval '7 days'"}
      events: {url: "sqlite:///srv/data/events.db", table: events}
      orders: {path: data/orders.parquet}
    password_file: secrets/db-password   # optional; else POC_SOURCE_PASSWORD

Each entry's kind is named by the key it carries (KINDS): `path` a Parquet file held in memory
(poc.sources.parquet), `url` a database table or query read through ADBC (poc.sources.database). A new kind of
source is one module with a Source class and a `from_spec`, and one line in KINDS.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BATCH_BYTES, ConfigError
from ..tunnel.messages import valid_dataset_name
from . import database, parquet
from .base import Described, Reader, Source, SpecLoader

KINDS: dict[str, SpecLoader] = {"path": parquet.from_spec, "url": database.from_spec}

__all__ = ["Described", "KINDS", "Reader", "Source", "load_sources", "load_data"]


def load_sources(path: str | Path, batch_bytes: int = BATCH_BYTES) -> dict[str, Source]:
    """Read a sources file into its datasets; ConfigError with the reason."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read sources file {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict) or not doc["datasets"]:
        raise ConfigError(f"{path}: expected 'datasets:' mapping names to {{url, table|query}} or {{path}}")
    shared = {"file": path, "password_file": doc.get("password_file"), "batch_bytes": batch_bytes}
    sources: dict[str, Source] = {}
    for name, spec in doc["datasets"].items():
        where = f"{path}: dataset {name!r}"
        if not valid_dataset_name(name):
            raise ConfigError(f"{where}: not a dataset name (1-128 of A-Z a-z 0-9 _ - .; docs/protocol.md §3a)")
        kind = next((key for key in KINDS if isinstance(spec, dict) and key in spec), None)
        if kind is None:
            raise ConfigError(f"{where}: give url with table or query, or path")
        sources[name] = KINDS[kind](name, spec, where, shared)
    return sources


def load_data(data: str | Path | None, sources_file: str | Path | None,
              batch_bytes: int = BATCH_BYTES) -> dict[str, Source]:
    """`--data` and `--sources` together: every dataset a connector (or the direct server) serves."""
    if not data and not sources_file:
        raise ConfigError("give --data (Parquet) or --sources (a YAML file of datasets), or both")
    found: dict[str, Source] = dict(parquet.load_folder(data, batch_bytes)) if data else {}
    if sources_file:
        listed = load_sources(sources_file, batch_bytes)
        clash = set(listed) & set(found)
        if clash:
            raise ConfigError(f"datasets named both in --data and in --sources: {sorted(clash)}")
        found.update(listed)
    return found
