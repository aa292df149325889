"""The gateway's buffer budget, shared by every tenant with a share for each (docs/security.md).

Each open stream reserves its window (docs/protocol.md §5) when it opens and what the window grows by
(§5b) as it grows, so the sum of reservations bounds what the gateway holds, whatever clients and connectors
do. A tenant may reserve at most its share (`--max-tenant-buffered-bytes`, half the budget by default): with
one tenant holding all it may, the others still have the rest. Windows grow only within half the budget and
half the tenant's share, so growth never takes the room new streams need for their initial windows, the
tenant's own included.
"""

from __future__ import annotations

import threading

from ..errors import Unavailable


class BufferBudget:
    """Reservations by tenant against a gateway-wide `limit` and a per-tenant `tenant_limit` (0: no cap)."""

    def __init__(self, limit: int, tenant_limit: int = 0) -> None:
        self.limit = limit
        self.tenant_limit = tenant_limit
        self.reserved = 0
        self._by_tenant: dict[str, int] = {}
        self._lock = threading.Lock()  # reserved on the loop, read by the HTTP and metrics threads

    def reserve(self, tenant: str, size: int) -> None:
        """Reserve a new stream's window, or Unavailable naming the cap it would pass."""
        with self._lock:
            held = self._by_tenant.get(tenant, 0)
            if self.tenant_limit and held + size > self.tenant_limit:
                raise Unavailable(
                    f"tenant {tenant} is at its share of the gateway's buffer ({self.tenant_limit} bytes reserved "
                    "by its open streams); retry when one ends")
            if self.limit and self.reserved + size > self.limit:
                raise Unavailable(
                    f"gateway is at its buffer limit ({self.limit} bytes reserved by open streams); retry later")
            self._take(tenant, held, size)

    def try_grow(self, tenant: str, size: int) -> bool:
        """Reserve for a window that widens (protocol §5b): within half the tenant's share and half the whole
        budget (the other halves stay for streams yet to open)."""
        with self._lock:
            held = self._by_tenant.get(tenant, 0)
            if (self.tenant_limit and held + size > self.tenant_limit // 2) or (
                    self.limit and self.reserved + size > self.limit // 2):
                return False
            self._take(tenant, held, size)
            return True

    def _take(self, tenant: str, held: int, size: int) -> None:
        self._by_tenant[tenant] = held + size
        self.reserved += size

    def release(self, tenant: str, size: int) -> None:
        with self._lock:
            left = self._by_tenant.get(tenant, 0) - size
            if left > 0:
                self._by_tenant[tenant] = left
            else:
                self._by_tenant.pop(tenant, None)
            self.reserved -= size

    def held_by(self, tenant: str) -> int:
        """What the tenant's open streams have reserved."""
        return self._by_tenant.get(tenant, 0)
