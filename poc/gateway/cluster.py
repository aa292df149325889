"""Replicas sharing a registry (`--registry`): which replica serves a call, and forwarding it there.

`ClusterRouter` is the Router (poc.gateway.routing) of a replica. It serves a call here when this replica holds
the tenant's tunnel and still owns it (`ClusterLinks.pick`, the bridge's picker, confirms with the registry), and
forwards it to the replica that does otherwise: GetFlightInfo and ListFlights are asked of the owner, whose
answer names its own location in each endpoint, so clients that follow locations read from it; a DoGet is
forwarded over Flight and streamed through batch by batch (gRPC's flow control bounds what waits here).
Forwarded calls carry peer credentials for that one call with the epoch of the tunnel they are for; the owner
refuses them unless it still holds that tunnel's registry entry. When no other replica can serve, a tunnel of
this replica on its way out (draining, or moving) still serves while it is open.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import PEER_HEADER, PeerCredentials, action_bytes
from ..errors import Unavailable
from ..sql.service import sql_command
from .bridge import NotHere
from .directory import RedisDirectory, RegistryUnavailable, TunnelEntry
from .link import TenantLink
from .peer_resume import read_resume_ticket
from .metrics import GatewayMetrics
from .registry import TenantRegistry
from .routing import LocalRouter, Stream, query_ticket

STALE = "stale owner"


class ClusterLinks:
    """The bridge's picker with replicas: the caller's link here, if this replica may serve it as its tunnel's
    owner; NotHere if the call should go to another replica."""

    def __init__(self, registry: TenantRegistry, directory: RedisDirectory) -> None:
        self.registry = registry
        self.directory = directory

    async def pick(self, who) -> TenantLink:
        """A forwarded call (`who.peer_epoch`) must find the tunnel of its epoch here. While this replica
        drains, or its tunnel is moving, a client's call goes to another replica if the tenant has a tunnel
        there (unless `who.leaving_ok`: no other could serve), and is served here by the tunnel still open if
        not."""
        tenant_id, epoch = who.tenant_id, who.peer_epoch
        if epoch is not None:  # whichever of the tenant's tunnels has that epoch
            link = next((x for x in self.registry.tenant_links(tenant_id)
                         if x.epoch == epoch and x.closing_reason is None), None)
        else:
            link = self.registry.local(tenant_id, include_draining=True)
        if (link is not None and epoch is None and not who.leaving_ok and (self.registry.draining or link.moving)
                and await self.elsewhere(tenant_id)):
            raise NotHere(tenant_id)  # this link is on its way out and the tenant has one on another replica
        if link is not None and await self.directory.confirm(link, epoch):
            return link
        if epoch is not None:
            raise Unavailable(f"{STALE}: this gateway does not hold tenant {tenant_id}'s tunnel "
                                                f"of epoch {epoch} (any more)")
        raise NotHere(tenant_id)

    async def elsewhere(self, tenant_id: str) -> bool:
        """Whether the tenant has a tunnel on another replica (registry read now); False when it cannot say."""
        try:
            return any(e.gateway != self.directory.gateway_id for e in await self.directory.tunnels(tenant_id))
        except Exception:  # the registry cannot say: serve here while the tunnel is open
            return False


class ClusterRouter:
    """A replica's Router: each call here (`local`) or at the owner of the tenant's tunnel (module docstring)."""

    def __init__(self, local: LocalRouter, directory: RedisDirectory, peers: PeerCredentials, await_on_loop: Callable,
                 timeout_s: float, metrics: GatewayMetrics, peer_ca: bytes | None = None) -> None:
        self.local = local
        self.directory = directory
        self.peers = peers
        self._await = await_on_loop
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._tls = {"tls_root_certs": peer_ca} if peer_ca else {}  # grpc+tls:// peers: trust this CA
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    # -- the Router: here, or there

    def _route(self, who, here: Callable, there: Callable):
        """`here(who)`; when the tenant's tunnel is on another replica, `there()`; when no other replica can
        serve, `here` once more with this replica's tunnel on its way out."""
        try:
            return here(who)
        except NotHere:
            try:
                return there()
            except (Unavailable, flight.FlightUnavailableError):
                try:
                    return here(who.leaving())
                except (NotHere, Unavailable):
                    pass
                raise

    def flight_info(self, who, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return self._route(who, lambda w: self.local.flight_info(w, descriptor),
                           lambda: self._at_owner(who, "get_flight_info", descriptor.serialize(),
                                                  lambda c, o: c.get_flight_info(descriptor, o)))

    def schema(self, who, descriptor: flight.FlightDescriptor) -> pa.Schema:
        return self._route(who, lambda w: self.local.schema(w, descriptor),
                           lambda: self._at_owner(who, "get_flight_info", descriptor.serialize(),
                                                  lambda c, o: c.get_flight_info(descriptor, o)).schema)

    def list_flights(self, who) -> list[flight.FlightInfo]:
        return self._route(who, self.local.list_flights,
                           lambda: self._at_owner(who, "list_flights", b"", lambda c, o: list(c.list_flights(options=o))))

    def action_types(self) -> list[tuple[str, str]]:
        return self.local.action_types()

    def do_action(self, who, action: flight.Action) -> list[bytes]:
        return self._route(who, lambda w: self.local.do_action(w, action),
                           lambda: self._at_owner(who, "do_action", action_bytes(action),
                                                  lambda c, o: [r.body.to_pybytes() for r in c.do_action(action, o)]))

    def do_get(self, who, ticket: flight.Ticket, cancelled: Callable[[], bool]) -> Stream | pa.Table:
        if read_resume_ticket(ticket.ticket) is not None:  # a peer resuming a stream here: here or nowhere
            try:
                return self.local.do_get(who, ticket, cancelled)
            except NotHere:
                raise Unavailable(f"{STALE}: this gateway holds no tunnel of tenant {who.tenant_id} "
                                  "to resume the stream on") from None
        epoch = None if sql_command(ticket.ticket) is not None else self.local.claims(who, ticket)[1]
        return self._route(who, lambda w: self.local.do_get(w, ticket, cancelled),
                           lambda: self._stream_at_owner(who, ticket, epoch))

    def dataset_names(self, who) -> list[str]:
        return self._route(who, self.local.dataset_names,
                           lambda: [info.descriptor.path[1].decode() for info in self.list_flights(who)])

    def read_dataset(self, who, name: str) -> Stream:
        def there():
            info = self.flight_info(who, flight.FlightDescriptor.for_path("dataset", name))
            return self._stream_at_owner(who, info.endpoints[0].ticket, None)
        return self._route(who, lambda w: self.local.read_dataset(w, name), there)

    def run_query(self, who, sql: str) -> Stream:
        ticket = query_ticket(sql)
        return self._route(who, lambda w: self.local.run_query(w, sql),
                           lambda: self._stream_at_owner(who, ticket, None))

    # -- forwarding

    def _client(self, location: str) -> flight.FlightClient:
        with self._lock:
            client = self._clients.get(location)
            if client is None:
                client = self._clients[location] = flight.connect(location, **self._tls)
            return client

    def _options(self, who, entry: TunnelEntry, method: str, request: bytes,
                 timeout: float | None) -> flight.FlightCallOptions:
        """Peer credentials for this one call (method and request) at this one replica and tunnel."""
        credentials = self.peers.make(who.tenant_id, entry.epoch, entry.gateway, method, request)
        return flight.FlightCallOptions(timeout=timeout, headers=[
            (PEER_HEADER.encode(), credentials.encode()), (b"x-request-id", who.request_id.encode())])

    def remote_tunnels(self, tenant_id: str, prefer_epoch: int | None = None) -> list[TunnelEntry]:
        """The tenant's tunnels on other replicas, read from the registry now, in the order to try them: the
        one of `prefer_epoch` first, then the others in random order (spreading the load)."""
        try:
            entries = self._await(self.directory.tunnels(tenant_id))
        except RegistryUnavailable as exc:
            raise Unavailable(
                f"tenant {tenant_id} has no tunnel on this gateway and the {exc}") from None
        remote = [e for e in entries if e.gateway != self.directory.gateway_id]
        if not remote:
            uptime = self._await(self.directory.uptime_s())
            if uptime is not None and uptime < self.directory.ttl_s:
                raise Unavailable(
                    f"tenant {tenant_id} is not in the registry yet: the registry (Redis) restarted {uptime:.0f} s "
                    "ago and the replicas are publishing their tunnels again; retry")
            raise Unavailable(f"tenant {tenant_id} is offline: no connector is registered")
        random.shuffle(remote)
        remote.sort(key=lambda e: e.epoch != prefer_epoch)
        return remote[:3]  # an unreachable or refusing owner: the next tunnel, a few at most

    def _at_owner(self, who, method: str, request: bytes, call, prefer_epoch: int | None = None,
                  streamed: bool = False):
        """`call(client, options)` at the owner of one of the tenant's tunnels; on a stale-owner refusal, at
        the next one. A call answered by a stream (`streamed`) has no deadline of its own: gRPC's would end
        the whole stream, however it moves; the owner bounds each wait for its connector, the client's call
        its own."""
        tunnels = self.remote_tunnels(who.tenant_id, prefer_epoch)
        for i, entry in enumerate(tunnels):
            try:
                result = call(self._client(entry.flight),
                              self._options(who, entry, method, request, None if streamed else self.timeout_s))
            except flight.FlightUnavailableError:
                if i + 1 < len(tunnels):  # a stale or unreachable owner (killed, draining): the next tunnel
                    continue
                self.metrics.forwarded.labels(method, "unavailable").inc()
                raise
            except Exception:
                self.metrics.forwarded.labels(method, "error").inc()
                raise
            self.metrics.forwarded.labels(method, "ok").inc()
            return result
        raise AssertionError("unreachable")

    def _stream_at_owner(self, who, ticket: flight.Ticket, epoch: int | None) -> Stream:
        """(schema, batches) of the owner's stream; the schema has arrived when this returns."""
        reader, schema = self.do_get_at_owner(who, ticket, epoch)
        return schema, _relay(reader)

    def do_get_at_owner(self, who, ticket: flight.Ticket,
                        epoch: int | None = None) -> tuple[flight.FlightStreamReader, pa.Schema]:
        """The owner's reader of `ticket` (also a stream cut off here, resumed there: poc.gateway.peer_resume)
        and its schema; Unavailable when no other replica holds a tunnel of the tenant."""
        def call(client, options):
            reader = client.do_get(ticket, options)
            return reader, reader.schema  # the owner's refusal arrives with the schema
        return self._at_owner(who, "do_get", ticket.ticket, call, prefer_epoch=epoch, streamed=True)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _relay(reader: flight.FlightStreamReader) -> Iterator:
    """The owner's batches, one at a time; a client that leaves cancels the owner's stream."""
    finished = False
    try:
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                finished = True
                return
            yield chunk.data
    finally:
        if not finished:
            reader.cancel()
