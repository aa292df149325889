"""Where every tenant's tunnels are, across gateway replicas (`--registry redis://…`).

Redis holds one entry per live tunnel, `poc:tunnel:<tenant>:<session>` = {tenant, gateway, session, flight,
epoch}, with a TTL that only the owning gateway renews (a compare-and-renew script: the entry must still be
the exact value it wrote). `poc:tunnels:<tenant>` indexes a tenant's sessions; `poc:epoch:<tenant>` counts
its registrations: each registration takes the next epoch, the fencing token that travels in tickets and
forwarded calls, so a gateway serves as a tunnel's owner only while the registry still holds that tunnel's
entry with that epoch. `poc:gateway:<id>` (also with a TTL) says each replica's Flight location and load.

Every routing decision reads Redis; nothing is cached. When Redis cannot be reached the gateway goes on
serving the tunnels it holds, refuses what it cannot route with a FlightUnavailableError naming the cause,
reports it in /readyz and metrics, and publishes its entries again once Redis answers.

What Redis holds is checked when it is read (docs/security.md, "Replicas and Redis"): an entry must be well
formed and name the tenant of its key, and its Flight location must be one this replica trusts — a location
of `--peer-flight` when the operator lists them, else the location the named replica advertises in its own
record, with this replica's scheme (a TLS cluster never forwards in the clear). Anything else is ignored and
logged: a registry entry alone never sends a call, or a client, to a host that is not a replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass

from ..tunnel.messages import TRACE_ID
from .link import TenantLink

log = logging.getLogger("poc.gateway")

PREFIX = "poc:"

# Extend the entry's TTL only if it is still exactly what this gateway wrote.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Delete a key only if it still holds this value.
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Delete the entry only if it is still this gateway's; always drop the session from the tenant's index.
WITHDRAW = """
local removed = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then removed = redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return removed
"""


@dataclass(frozen=True)
class TunnelEntry:
    """One live tunnel as the registry knows it."""

    tenant: str
    gateway: str   # the owning gateway's id
    session: str
    flight: str    # the owner's advertised Flight location
    epoch: int
    connector: str = ""  # the registration's connector_id (protocol.md §2)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, raw: bytes | str, tenant: str) -> "TunnelEntry | None":
        """The entry of `tenant` this text holds, or None when it is not one a gateway of this version wrote
        for that tenant (malformed, another tenant's, a location that is not a Flight URI)."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(doc, dict) or set(doc) - {"tenant", "gateway", "session", "flight", "epoch", "connector"}:
            return None
        texts = [doc.get(k) for k in ("tenant", "gateway", "session", "flight")]
        connector, epoch = doc.get("connector", ""), doc.get("epoch")
        if not all(isinstance(t, str) for t in texts) or not isinstance(connector, str) \
                or not isinstance(epoch, int) or isinstance(epoch, bool):
            return None
        entry = cls(*texts, epoch, connector)
        if (entry.tenant != tenant or not GATEWAY_ID.fullmatch(entry.gateway) or not SESSION.fullmatch(entry.session)
                or not FLIGHT_LOCATION.fullmatch(entry.flight) or not 1 <= entry.epoch < 2**63
                or (entry.connector and not TRACE_ID.fullmatch(entry.connector))):
            return None
        return entry


GATEWAY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # --gateway-id
SESSION = re.compile(r"sess_[0-9a-f]{16}")
FLIGHT_LOCATION = re.compile(r"(grpc|grpc\+tcp|grpc\+tls)://[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|"
                             r"(grpc|grpc\+tcp|grpc\+tls)://\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def scheme_of(location: str) -> str:
    """grpc+tls for a TLS location, grpc otherwise (grpc and grpc+tcp are the same)."""
    return "grpc+tls" if location.startswith("grpc+tls://") else "grpc"


class RegistryUnavailable(Exception):
    """Redis cannot be reached (or answered with an error); the message names the cause."""


def _record(raw) -> dict | None:
    """A replica's record (`poc:gateway:<id>`), checked: an object whose id, location, count and flags have
    their types; None otherwise."""
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not GATEWAY_ID.fullmatch(doc["id"]):
        return None
    tunnels, at = doc.get("tunnels", 0), doc.get("at", 0)
    if not isinstance(tunnels, int) or isinstance(tunnels, bool) or not isinstance(at, (int, float)):
        return None
    if not isinstance(doc.get("flight"), str) or not FLIGHT_LOCATION.fullmatch(doc["flight"]):
        return None
    if (not isinstance(doc.get("tunnel", ""), str) or not isinstance(doc.get("flight_tunnel", ""), str)
            or not isinstance(doc.get("draining", False), bool)):
        return None
    return doc


def _record_flight(raw) -> str | None:
    record = _record(raw)
    return record["flight"] if record is not None else None


def _tunnel_key(tenant: str, session: str) -> str:
    return f"{PREFIX}tunnel:{tenant}:{session}"


def _index_key(tenant: str) -> str:
    return f"{PREFIX}tunnels:{tenant}"


class RedisDirectory:
    """The registry of one gateway replica; its coroutines run on the gateway's event loop."""

    def __init__(self, url: str, gateway_id: str, flight_location: str, ttl_s: float = 10.0,
                 timeout_s: float = 1.0, on_error=lambda: None, trusted: tuple[str, ...] = ()) -> None:
        import redis.asyncio as redis

        self.gateway_id = gateway_id
        self.flight_location = flight_location
        self.trusted = set(trusted)  # --peer-flight: the replicas' Flight locations; empty: as they advertise
        self.ignored = 0  # entries read and ignored (malformed, or a location no replica vouches for)
        self._told: set[str] = set()  # what was logged about ignored entries (bounded)
        self.ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        # One immediate retry on a broken connection: after Redis restarts, each pooled connection fails once
        # ("Connection closed by server") before the pool opens a new one; a call should not pay for that.
        self._redis = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._renew = self._redis.register_script(RENEW)
        self._withdraw = self._redis.register_script(WITHDRAW)
        self._delete_if = self._redis.register_script(DELETE_IF)
        self.error: str | None = "not connected yet"  # None while Redis answers
        self._on_error = on_error
        self._owned: dict[str, tuple[TenantLink, TunnelEntry | None]] = {}  # session → (link, published entry)
        self._load = lambda: len(self._owned)
        self.record: dict = {}  # more of this replica's record: its tunnel URLs, whether it drains

    @property
    def available(self) -> bool:
        return self.error is None

    async def _call(self, make):
        """Run one Redis step; a failure marks the registry unavailable and raises RegistryUnavailable."""
        from redis.exceptions import RedisError

        try:
            result = await make()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            cause = f"registry (Redis) unreachable: {type(exc).__name__}: {str(exc)[:200]}"
            if self.error is None:
                log.error("%s; serving the tunnels held here only", cause)
            self.error = cause
            self._on_error()
            raise RegistryUnavailable(cause) from None
        if self.error is not None:
            log.info("registry (Redis) reachable")
            self.error = None
        return result

    # -- this gateway's tunnels ------------------------------------------------------------------------

    async def publish(self, link: TenantLink) -> int:
        """Take the tenant's next epoch and publish the tunnel's entry; on Redis trouble the tunnel still
        serves here, gets a provisional epoch of 0 and is published by the next renewal that reaches Redis."""
        self._owned[link.session_id] = (link, None)
        try:
            entry = await self._publish(link)
        except RegistryUnavailable:
            link.epoch = 0
            return 0
        return entry.epoch

    async def _publish(self, link: TenantLink) -> TunnelEntry:
        async def step():
            epoch = await self._redis.incr(f"{PREFIX}epoch:{link.tenant_id}")
            entry = TunnelEntry(link.tenant_id, self.gateway_id, link.session_id, self.flight_location, int(epoch),
                                link.connector_id)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_tunnel_key(entry.tenant, entry.session), entry.encode(), px=self.ttl_ms)
                pipe.sadd(_index_key(entry.tenant), entry.session)
                await pipe.execute()
            return entry
        entry = await self._call(step)
        if link.session_id in self._owned:  # still live
            self._owned[link.session_id] = (link, entry)
            link.epoch = entry.epoch
            link.lease_until = time.monotonic() + self.ttl_s
        return entry

    async def withdraw(self, link: TenantLink) -> None:
        """The tunnel closed: its entry goes (if Redis is down, its TTL ends it)."""
        _, entry = self._owned.pop(link.session_id, (None, None))
        if entry is None:
            return
        try:
            await self._call(lambda: self._withdraw(keys=[_tunnel_key(entry.tenant, entry.session),
                                                          _index_key(entry.tenant)],
                                                    args=[entry.encode(), entry.session]))
        except RegistryUnavailable:
            pass

    async def renew_all(self) -> list[TenantLink]:
        """Extend every entry this gateway owns and its own record; publish what Redis lost or never got.
        Returns the links whose entry is gone and must not be served as owner any more (another
        registration took the tenant's place while this gateway could not renew)."""
        started = time.monotonic()
        owned = list(self._owned.values())
        published = [(link, entry) for link, entry in owned if entry is not None]

        async def step():
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, entry in published:
                    await self._renew(keys=[_tunnel_key(entry.tenant, entry.session)],
                                      args=[entry.encode(), self.ttl_ms], client=pipe)
                pipe.set(f"{PREFIX}gateway:{self.gateway_id}",
                         json.dumps({"id": self.gateway_id, "flight": self.flight_location,
                                     "tunnels": self._load(), "at": round(time.time(), 3), **self.record}),
                         px=self.ttl_ms)
                pipe.sadd(f"{PREFIX}gateways", self.gateway_id)
                return await pipe.execute()
        results = await self._call(step)
        lost = []
        for (link, entry), renewed in zip(published, results):
            if renewed:
                link.lease_until = started + self.ttl_s
            elif await self._superseded(entry):
                lost.append(link)  # its connector registered again elsewhere while this entry could not be renewed
            else:
                await self._republish(link)  # Redis forgot it (a restart, a flush, an outage longer than the TTL)
        for link, entry in owned:
            if entry is None and link.session_id in self._owned:
                await self._republish(link)
        return lost

    async def _superseded(self, entry: TunnelEntry) -> bool:
        """Whether a newer registration of the same connector tunnel (same connector_id, higher epoch) is in
        the registry: then this gateway's tunnel is a stale owner's and must not be published again."""
        try:
            return any(e.connector == entry.connector and e.epoch > entry.epoch and e.session != entry.session
                       for e in await self.tunnels(entry.tenant))
        except RegistryUnavailable:
            return False

    async def _republish(self, link: TenantLink) -> None:
        try:
            await self._publish(link)
            log.info("tenant %s session %s published again (epoch %d)", link.tenant_id, link.session_id,
                     link.epoch, extra={"tenant": link.tenant_id, "session": link.session_id})
        except RegistryUnavailable:
            pass

    async def confirm(self, link: TenantLink, epoch: int | None = None) -> bool:
        """Whether this gateway may serve `link` as its tunnel's owner (for a forwarded call: the tunnel of
        `epoch`). Within its lease (the last renewal Redis acknowledged, plus the TTL) it may; past it — a
        gateway that stalled, or could not reach Redis — it asks Redis whether the entry is still its own,
        and may not if the entry is gone (another registration may own the tenant now). When Redis cannot
        be reached it serves the tunnel it holds (docs/architecture.md: availability over fencing while the
        registry is down)."""
        if epoch is not None and link.epoch != epoch:
            return False
        if time.monotonic() < link.lease_until:
            return True
        _, entry = self._owned.get(link.session_id, (None, None))
        if entry is None:
            return not self.available and link.session_id in self._owned  # never published: Redis is down
        started = time.monotonic()
        try:
            renewed = await self._call(lambda: self._renew(keys=[_tunnel_key(entry.tenant, entry.session)],
                                                           args=[entry.encode(), self.ttl_ms]))
        except RegistryUnavailable:
            return True
        if renewed:
            link.lease_until = started + self.ttl_s
            return True
        if await self._superseded(entry):
            return False
        await self._republish(link)  # Redis lost it (restart, flush): this gateway still holds the tunnel
        return link.lease_until > time.monotonic()

    # -- every replica's tunnels -----------------------------------------------------------------------

    async def tunnels(self, tenant: str) -> list[TunnelEntry]:
        """The tenant's live tunnels on every replica, read from Redis now: only well-formed entries whose
        location a replica vouches for (module docstring)."""
        async def step():
            sessions = [s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                        for s in await self._redis.smembers(_index_key(tenant))][:64]
            if not sessions:
                return []
            values = await self._redis.mget([_tunnel_key(tenant, s) for s in sessions])
            gone = [s for s, v in zip(sessions, values) if v is None]
            if gone:
                await self._redis.srem(_index_key(tenant), *gone)
            entries = [self._entry(v, tenant) for v in values if v is not None]
            return await self._vouched([e for e in entries if e is not None])
        return await self._call(step)

    def _entry(self, raw, tenant: str) -> TunnelEntry | None:
        entry = TunnelEntry.decode(raw, tenant)
        if entry is None:
            self._ignore(f"a malformed registry entry for tenant {tenant}: {str(raw)[:200]}")
        return entry

    async def _vouched(self, entries: list[TunnelEntry]) -> list[TunnelEntry]:
        """The entries whose Flight location is a replica's: this one's own, one of --peer-flight, or (without
        that list) the one the named replica advertises in its record; always with this replica's scheme."""
        advertised: dict[str, str] = {}
        if not self.trusted:
            ids = sorted({e.gateway for e in entries if e.gateway != self.gateway_id})
            records = await self._redis.mget([f"{PREFIX}gateway:{i}" for i in ids]) if ids else []
            for gateway, record in zip(ids, records):
                location = _record_flight(record)
                if location is not None:
                    advertised[gateway] = location
        kept = []
        for entry in entries:
            if entry.gateway == self.gateway_id:
                good = entry.flight == self.flight_location
            elif self.trusted:
                good = entry.flight in self.trusted
            else:
                good = advertised.get(entry.gateway) == entry.flight
            if good and scheme_of(entry.flight) == scheme_of(self.flight_location or entry.flight):
                kept.append(entry)
            else:
                self._ignore(f"tenant {entry.tenant}'s registry entry names {entry.flight!r} for replica "
                             f"{entry.gateway!r}, which no replica vouches for")
        return kept

    def _ignore(self, what: str) -> None:
        self.ignored += 1
        if what not in self._told and len(self._told) < 256:
            self._told.add(what)
            log.warning("ignored %s", what)

    async def all_tunnels(self, tenants: list[str]) -> dict[str, list[TunnelEntry]]:
        """Every listed tenant's live tunnels on every replica (for GET /health)."""
        async def step():
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.smembers(_index_key(tenant))
                indexes = await pipe.execute()
            owners = [(t, s.decode("utf-8", "replace")) for t, sessions in zip(tenants, indexes)
                      for s in list(sessions)[:64]]
            values = await self._redis.mget([_tunnel_key(t, s) for t, s in owners]) if owners else []
            found: dict[str, list[TunnelEntry]] = {}
            for (tenant, _), value in zip(owners, values):
                entry = self._entry(value, tenant) if value is not None else None
                if entry is not None:
                    found.setdefault(entry.tenant, []).append(entry)
            vouched = set(await self._vouched([e for entries in found.values() for e in entries]))
            return {t: [e for e in entries if e in vouched] for t, entries in found.items()}
        return await self._call(step)

    async def claim_move(self, tenant: str, gateway_id: str, hold_s: float = 60.0) -> bool:
        """Take the right to move one of the tenant's tunnels (rebalancing): one replica at a time, so that
        two never empty a tenant's tunnels at once. Released by `release_move`, or after `hold_s`."""
        return bool(await self._call(lambda: self._redis.set(f"{PREFIX}moving:{tenant}", gateway_id, nx=True,
                                                             px=int(hold_s * 1000))))

    async def release_move(self, tenant: str, gateway_id: str) -> None:
        await self._call(lambda: self._delete_if(keys=[f"{PREFIX}moving:{tenant}"], args=[gateway_id]))

    async def uptime_s(self) -> float | None:
        """How long the Redis server has been up (None if it cannot say): shorter than the TTL means the
        replicas may not have published their tunnels again yet."""
        try:
            info = await self._call(lambda: self._redis.info("server"))
            return float(info.get("uptime_in_seconds"))
        except (RegistryUnavailable, TypeError, ValueError):
            return None

    async def gateways(self) -> list[dict]:
        """Every replica with a live, well-formed record: id, Flight location, tunnels held."""
        async def step():
            ids = [i.decode("utf-8", "replace") for i in await self._redis.smembers(f"{PREFIX}gateways")][:256]
            values = await self._redis.mget([f"{PREFIX}gateway:{i}" for i in ids]) if ids else []
            gone = [i for i, v in zip(ids, values) if v is None]
            if gone:
                await self._redis.srem(f"{PREFIX}gateways", *gone)
            return [record for record in map(_record, values) if record is not None]
        return await self._call(step)

    async def close(self) -> None:
        for link, _ in list(self._owned.values()):
            await self.withdraw(link)
        try:
            await self._call(lambda: self._redis.delete(f"{PREFIX}gateway:{self.gateway_id}"))
        except RegistryUnavailable:
            pass
        await self._redis.aclose()
