"""tenant_id → its live links on this gateway, one per connector (docs/protocol.md §2)."""

from __future__ import annotations

import itertools
import threading

from ..config import TenantCredentials
from ..errors import Unavailable
from .link import TenantLink


class TenantRegistry:
    """Mutated on the event loop only; `snapshot` may be read from any thread.

    A tenant may have several links here, one per `connector_id`; a registration with the connector_id of a
    live link replaces it (connectors of protocol 1.2 and older send none and share the id ""). Calls are
    spread over a tenant's links: the one with the fewest open streams, in turn when they tie."""

    def __init__(self, tenants: dict[str, TenantCredentials]) -> None:
        self.tenants = tenants
        self._links: dict[str, dict[str, TenantLink]] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self.draining = False  # set on shutdown: no new calls reach a tunnel

    def register(self, link: TenantLink) -> TenantLink | None:
        """Add `link`; return the link of the same tenant and connector it replaces, if any."""
        with self._lock:
            by_connector = self._links.setdefault(link.tenant_id, {})
            old = by_connector.get(link.connector_id)
            by_connector[link.connector_id] = link
        return old

    def unregister(self, link: TenantLink) -> None:
        """Forget `link` unless a newer link already replaced it."""
        with self._lock:
            by_connector = self._links.get(link.tenant_id, {})
            if by_connector.get(link.connector_id) is link:
                del by_connector[link.connector_id]
                if not by_connector:
                    del self._links[link.tenant_id]

    def local(self, tenant_id: str, include_draining: bool = False) -> TenantLink | None:
        """A live link of the tenant on this gateway to serve a call, or None (none, or draining unless
        `include_draining`)."""
        if self.draining and not include_draining:
            return None
        live = [link for link in self._links.get(tenant_id, {}).values() if link.closing_reason is None]
        live = [link for link in live if not link.moving] or live
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        least = min(link.streams_in_flight for link in live)
        candidates = [link for link in live if link.streams_in_flight == least]
        return candidates[next(self._turn) % len(candidates)]

    def live(self, tenant_id: str) -> TenantLink:
        """A live link of the tenant (as `local`), or Unavailable at once."""
        if self.draining:
            raise Unavailable("gateway is shutting down; retry on another gateway")
        link = self.local(tenant_id)
        if link is None:
            raise Unavailable(f"tenant {tenant_id} is offline: no connector is registered")
        return link

    def links(self) -> list[TenantLink]:
        with self._lock:
            return [link for by_connector in self._links.values() for link in by_connector.values()]

    def tenant_links(self, tenant_id: str) -> list[TenantLink]:
        with self._lock:
            return list(self._links.get(tenant_id, {}).values())

    def snapshot(self) -> dict:
        """Per tenant: the newest link's view and how many links the tenant has here, or offline."""
        with self._lock:
            links = {t: list(by.values()) for t, by in self._links.items()}
        result = {}
        for tenant_id in sorted(set(self.tenants) | set(links)):
            mine = links.get(tenant_id)
            if mine:
                newest = max(mine, key=lambda link: link.connected_at)
                result[tenant_id] = {**newest.snapshot(), "tunnels_here": len(mine)}
            else:
                result[tenant_id] = {"status": "offline"}
        return result
