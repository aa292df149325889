"""The load client: N requests over T tenants, bounded concurrency, per-phase timings."""

from .client import LoadConfig, RequestRecord, run_load
from .metrics import summarize

__all__ = ["LoadConfig", "RequestRecord", "run_load", "summarize"]
