"""tenant_id → live link; a newer registration replaces the older one."""

from __future__ import annotations

import threading

import pyarrow.flight as flight

from ..config import TenantCredentials
from .link import TenantLink


class TenantRegistry:
    """Mutated on the event loop only; `snapshot` may be read from any thread."""

    def __init__(self, tenants: dict[str, TenantCredentials]) -> None:
        self.tenants = tenants
        self._links: dict[str, TenantLink] = {}
        self._lock = threading.Lock()
        self.draining = False  # set on shutdown: no new calls reach a tunnel

    def register(self, link: TenantLink) -> TenantLink | None:
        """Make `link` the tenant's live link; return the link it replaces, if any."""
        with self._lock:
            old = self._links.get(link.tenant_id)
            self._links[link.tenant_id] = link
        return old

    def unregister(self, link: TenantLink) -> None:
        """Forget `link` unless a newer link already replaced it."""
        with self._lock:
            if self._links.get(link.tenant_id) is link:
                del self._links[link.tenant_id]

    def live(self, tenant_id: str) -> TenantLink:
        """The tenant's live link, or FlightUnavailableError at once."""
        if self.draining:
            raise flight.FlightUnavailableError("gateway is shutting down; retry on another gateway")
        link = self._links.get(tenant_id)
        if link is None or link.closing_reason is not None:
            raise flight.FlightUnavailableError(f"tenant {tenant_id} is offline: no connector is registered")
        return link

    def links(self) -> list[TenantLink]:
        with self._lock:
            return list(self._links.values())

    def snapshot(self) -> dict:
        with self._lock:
            links = dict(self._links)
        result = {}
        for tenant_id in sorted(set(self.tenants) | set(links)):
            link = links.get(tenant_id)
            result[tenant_id] = link.snapshot() if link else {"status": "offline"}
        return result
