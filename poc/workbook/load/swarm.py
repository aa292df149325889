"""`python -m poc swarm`: thousands of connectors in one process, to load a gateway with idle tunnels.

Each tunnel is a real `Connector` (the product's, with its registration, heartbeats and reconnect with
backoff and jitter) for one tenant of the tenants file, serving a ten-row dataset named `tiny`. They share
one event loop, so thousands fit on a small machine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pyarrow as pa

from ...catalog import Dataset
from ...sources.parquet import ParquetSource
from ...config import TenantCredentials
from ...connector import Connector, ConnectorConfig

log = logging.getLogger("poc.swarm")


def tiny_dataset() -> dict[str, ParquetSource]:
    table = pa.table({"id": pa.array(range(10), pa.int64()), "value": [f"v{i}" for i in range(10)]})
    return {"tiny": ParquetSource(Dataset("tiny", table.schema, table.to_batches()))}


class Swarm:
    """`count` connectors, one per tenant, started `per_second` at a time so the gateway sees no SYN flood."""

    def __init__(self, gateway: str, tenants: list[TenantCredentials], heartbeat_s: float, ws_impl: str,
                 per_second: float = 1000.0, ca_file: str | None = None) -> None:
        datasets = tiny_dataset()
        self.connectors = [Connector(ConnectorConfig(gateway=gateway, tenant_id=t.tenant_id, token=t.connector_token,
                                                     delay_ms=(0.0, 0.0), heartbeat_s=heartbeat_s, ws_impl=ws_impl,
                                                     ca_file=ca_file),
                                     datasets) for t in tenants]
        self.per_second = per_second
        self.failed: list[str] = []

    @property
    def registered(self) -> int:
        return sum(1 for c in self.connectors if c.online)

    async def run(self, stop: asyncio.Event, on_progress: Callable[[int, int], None] = lambda done, total: None
                  ) -> None:
        """Run every connector until `stop`; a connector that gives up (refused) is counted in `failed`."""
        tasks = []
        for i, connector in enumerate(self.connectors):
            tasks.append(asyncio.get_running_loop().create_task(self._one(connector, stop)))
            if (i + 1) % 100 == 0:
                await asyncio.sleep(100 / self.per_second)
        started = time.monotonic()
        while not stop.is_set():
            on_progress(self.registered, len(self.connectors))
            try:
                await asyncio.wait_for(stop.wait(), 1.0 if time.monotonic() - started < 60 else 5.0)
            except asyncio.TimeoutError:
                pass
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, connector: Connector, stop: asyncio.Event) -> None:
        try:
            await connector.run(stop)
        except Exception as exc:  # refused or replaced: this tunnel stops, the others go on
            self.failed.append(f"{connector.cfg.tenant_id}: {exc}")
