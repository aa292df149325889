"""This gateway as one replica of several (`--registry`): its tunnels published in the shared registry and renewed,
its share of all tunnels kept by rebalancing, its drain on SIGTERM, and /health's view of every replica. Calls are
routed by poc.gateway.cluster; the registry itself is poc.gateway.directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..tunnel import CloseCode
from .cluster import ClusterLinks
from .directory import RedisDirectory, RegistryUnavailable
from .link import TenantLink
from .registry import TenantRegistry

log = logging.getLogger("poc.gateway")

Drop = Callable[[TenantLink, str, int], None]  # take a link out of service now, closing it with a code


class Replica:
    """Runs on the gateway's loop. `drop` is the gateway's: it fails a link's calls and closes it."""

    def __init__(self, directory: RedisDirectory, registry: TenantRegistry, links: ClusterLinks, drop: Drop,
                 ttl_s: float, rebalance_s: float, drain_delay_s: float) -> None:
        self.directory = directory
        self.registry = registry
        self.links = links
        self.drop = drop
        self.ttl_s = ttl_s
        self.rebalance_s = rebalance_s
        self.drain_delay_s = drain_delay_s
        self._tasks: set[asyncio.Task] = set()

    @property
    def gateway_id(self) -> str:
        return self.directory.gateway_id

    async def start(self) -> None:
        """Publish this replica's record before it says it is ready; then renew, and rebalance."""
        with contextlib.suppress(RegistryUnavailable):
            await self.directory.renew_all()
        self._spawn(self._renew())
        if self.rebalance_s > 0:
            self._spawn(self._rebalance())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def registered(self, link: TenantLink) -> None:
        """A new tunnel: not served as owner before the registry has its entry (and epoch)."""
        link.lease_until = 0.0
        await self.directory.publish(link)

    def withdraw(self, link: TenantLink) -> None:
        """A tunnel closed: its entry goes (in the background; if Redis is down, its TTL ends it)."""
        self._spawn(self.directory.withdraw(link))

    async def stop(self, deadline: float, started: float) -> None:
        """On SIGTERM: drain (below), then keep answering — forwarding — for `drain_delay_s`, for clients that
        picked this replica while it was still ready."""
        for task in list(self._tasks):
            task.cancel()
        await self._drain(deadline)
        await asyncio.sleep(max(0.0, min(deadline, started + self.drain_delay_s) - time.monotonic()))

    async def close(self) -> None:
        await self.directory.close()

    async def _drain(self, deadline: float) -> None:
        """Goaway to every link of a 1.3 connector; wait until their tenants have a tunnel elsewhere (or the
        deadline); then withdraw this replica's entries (in-flight streams go on until they end)."""
        self.directory.record["draining"] = True
        with contextlib.suppress(RegistryUnavailable):
            await self.directory.renew_all()  # the others stop suggesting this replica
        told = [link for link in self.registry.links() if link.connector_id]
        for link in told:
            link.endpoint.goaway("gateway draining; open a tunnel to another gateway")
            link.transport.flush_soon()
        waiting = {link.tenant_id for link in told}
        log.info("draining: goaway sent on %d tunnels of %d tenants", len(told), len(waiting))
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            for tenant in list(waiting):
                try:
                    if any(e.gateway != self.gateway_id for e in await self.directory.tunnels(tenant)):
                        waiting.discard(tenant)
                except RegistryUnavailable:
                    break
        if waiting:
            log.warning("draining: %d tenants have no tunnel on another replica", len(waiting))
        for link in self.registry.links():
            await self.directory.withdraw(link)

    async def _renew(self) -> None:
        """Renew this replica's entries every third of the TTL; a tunnel whose entry ran out while it could
        not be renewed (and that Redis no longer holds) is closed with 4007: its connector registers again."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                lost = await self.directory.renew_all()
            except RegistryUnavailable:
                continue
            for link in lost:
                log.warning("tenant %s session %s: its registry entry ran out; closing the tunnel", link.tenant_id,
                            link.session_id, extra={"tenant": link.tenant_id, "session": link.session_id})
                self.drop(link, "the tunnel's registry entry ran out; register again", CloseCode.LEASE_LOST)

    async def _rebalance(self) -> None:
        """Every `rebalance_s`: if this replica holds more than its share of all tunnels (total over the
        replicas that are not draining, rounded up), ask one connector to move: goaway, suggesting the
        least-loaded replica. One at a time, and only links whose connector moves without a gap (1.3: it
        registers elsewhere before it closes this link)."""
        told: dict[str, float] = {}  # session → when it was asked to move
        while True:
            await asyncio.sleep(self.rebalance_s)
            try:  # replicas that renewed their record lately (a killed one's lingers until its TTL) and stay
                fresh = time.time() - self.ttl_s * 2 / 3
                records = [r for r in await self.directory.gateways()
                           if not r.get("draining") and r.get("at", 0) >= fresh]
            except RegistryUnavailable:
                continue
            mine = [link for link in self.registry.links() if link.closing_reason is None]
            live = {link.session_id for link in mine}
            told = {s: t for s, t in told.items() if s in live and time.monotonic() - t < 60}
            if len(records) < 2 or self.registry.draining:
                continue
            others = [r for r in records if r.get("id") != self.gateway_id and r.get("tunnel")]
            total = sum(r.get("tunnels", 0) for r in others) + len(mine)  # its own count as of now
            share = -(-total // (len(others) + 1))
            movable = [link for link in mine if link.connector_id and link.session_id not in told]
            if len(mine) <= share or not others or not movable or told:
                continue  # within its share, or a move still under way
            target = min(others, key=lambda r: r.get("tunnels", 0))
            if target.get("tunnels", 0) + 1 >= len(mine):
                continue  # moving one would not even things out
            link, baseline = await self._movable(movable, target["id"])
            if link is None:
                continue
            told[link.session_id] = time.monotonic()
            log.info("holding %d tunnels, share %d: asking tenant %s to move to %s", len(mine), share,
                     link.tenant_id, target["id"], extra={"tenant": link.tenant_id, "session": link.session_id})
            prefer = target.get("flight_tunnel") if link.transport.KIND == "flight" else target["tunnel"]
            link.endpoint.goaway(f"rebalancing: {self.gateway_id} holds more than its share", prefer or None)
            link.transport.flush_soon()
            link.moving = True
            self._spawn(self._close_when_moved(link, baseline))

    async def _movable(self, movable: list[TenantLink], target: str) -> tuple[TenantLink | None, int]:
        """A link to move, and the tenant's newest epoch now: not a tenant with a tunnel on the target already
        (its tunnels stay on distinct replicas), nor one another replica is moving right now (one move per
        tenant at a time, across replicas)."""
        for candidate in sorted(movable, key=lambda x: x.streams_in_flight)[:20]:
            try:
                entries = await self.directory.tunnels(candidate.tenant_id)
                if (all(e.gateway != target for e in entries)
                        and await self.directory.claim_move(candidate.tenant_id, self.gateway_id)):
                    return candidate, max(e.epoch for e in entries) if entries else 0
            except RegistryUnavailable:
                break
        return None, 0

    async def _close_when_moved(self, link: TenantLink, baseline: int, timeout: float = 60.0) -> None:
        """Close a link told goaway once the tenant has a newer tunnel on another replica and nothing is in
        flight on this one (the gateway knows what it sent; the connector closing it could cross a do_get)."""
        deadline = time.monotonic() + timeout
        while link.closing_reason is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                moved = any(e.gateway != self.gateway_id and e.epoch > baseline  # registered since the goaway
                            for e in await self.directory.tunnels(link.tenant_id))
            except RegistryUnavailable:
                continue
            if moved and link.idle:
                self.drop(link, "moved to another gateway", CloseCode.NORMAL)
                break
        with contextlib.suppress(RegistryUnavailable):
            await self.directory.release_move(link.tenant_id, self.gateway_id)
        if link.closing_reason is None:
            link.moving = False  # it did not move: serve from it as before

    def readiness(self, state: str) -> str:
        """GET /readyz: "ready" only while the registry answers: a replica that cannot route sends its clients
        elsewhere."""
        return "registry_unreachable" if state == "ready" and not self.directory.available else state

    def snapshot(self, local: dict, loop: asyncio.AbstractEventLoop) -> dict:
        """GET /health's tenants (HTTP thread): this replica's view with every replica's tunnels merged in; if
        the registry is down, this replica's view only, and why."""
        for tenant in local.values():
            if tenant["status"] == "online":
                tenant["gateway"] = self.gateway_id
        try:
            remote = asyncio.run_coroutine_threadsafe(self.directory.all_tunnels(list(local)), loop).result(10)
        except Exception as exc:
            for tenant in local.values():
                if tenant["status"] != "online":
                    tenant["status"] = "unknown"
                    tenant["error"] = str(exc)
            return local
        for tenant_id, entries in remote.items():
            elsewhere = [e for e in entries if e.gateway != self.gateway_id]
            if local.get(tenant_id, {}).get("status") != "online" and elsewhere:
                newest = max(elsewhere, key=lambda e: e.epoch)
                local[tenant_id] = {"status": "online", "gateway": newest.gateway, "session_id": newest.session,
                                    "epoch": newest.epoch, "flight": newest.flight}
            if entries and tenant_id in local:
                local[tenant_id]["tunnels"] = [{"gateway": e.gateway, "session_id": e.session, "epoch": e.epoch}
                                               for e in entries]
        return local
