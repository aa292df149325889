"""Flight calls for tenants whose tunnel is on another replica (`--registry`), on Flight's threads.

GetFlightInfo and ListFlights are asked of the owning replica, whose answer names itself in each endpoint's
`locations`: clients that follow locations read from the owner. A DoGet that reaches a replica without the
tenant's tunnel is forwarded to the owner over Flight and streamed through batch by batch (gRPC's flow
control bounds what waits here). Forwarded calls carry peer credentials with the epoch of the tunnel they
are for; the owner refuses them unless it still holds that tunnel's registry entry.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pyarrow.flight as flight

from ..auth import PEER_HEADER, PeerCredentials, action_bytes
from .directory import RedisDirectory, RegistryUnavailable, TunnelEntry
from .metrics import GatewayMetrics


class ClusterRouter:
    def __init__(self, directory: RedisDirectory, peers: PeerCredentials, await_on_loop: Callable,
                 timeout_s: float, metrics: GatewayMetrics, peer_ca: bytes | None = None) -> None:
        self.directory = directory
        self.peers = peers
        self._await = await_on_loop
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._tls = {"tls_root_certs": peer_ca} if peer_ca else {}  # grpc+tls:// peers: trust this CA
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    def _client(self, location: str) -> flight.FlightClient:
        with self._lock:
            client = self._clients.get(location)
            if client is None:
                client = self._clients[location] = flight.connect(location, **self._tls)
            return client

    def _options(self, who, entry: TunnelEntry, method: str, request: bytes) -> flight.FlightCallOptions:
        """Peer credentials for this one call (method and request) at this one replica and tunnel."""
        credentials = self.peers.make(who.tenant_id, entry.epoch, entry.gateway, method, request)
        return flight.FlightCallOptions(timeout=self.timeout_s, headers=[
            (PEER_HEADER.encode(), credentials.encode()), (b"x-request-id", who.request_id.encode())])

    def remote_tunnels(self, tenant_id: str, prefer_epoch: int | None = None) -> list[TunnelEntry]:
        """The tenant's tunnels on other replicas, read from the registry now, in the order to try them: the
        one of `prefer_epoch` first, then the others in random order (spreading the load)."""
        try:
            entries = self._await(self.directory.tunnels(tenant_id))
        except RegistryUnavailable as exc:
            raise flight.FlightUnavailableError(
                f"tenant {tenant_id} has no tunnel on this gateway and the {exc}") from None
        remote = [e for e in entries if e.gateway != self.directory.gateway_id]
        if not remote:
            uptime = self._await(self.directory.uptime_s())
            if uptime is not None and uptime < self.directory.ttl_s:
                raise flight.FlightUnavailableError(
                    f"tenant {tenant_id} is not in the registry yet: the registry (Redis) restarted {uptime:.0f} s "
                    "ago and the replicas are publishing their tunnels again; retry")
            raise flight.FlightUnavailableError(f"tenant {tenant_id} is offline: no connector is registered")
        random.shuffle(remote)
        remote.sort(key=lambda e: e.epoch != prefer_epoch)
        return remote[:3]  # an unreachable or refusing owner: the next tunnel, a few at most

    def _each_owner(self, who, method: str, request: bytes, call, prefer_epoch: int | None = None):
        """`call(client, options)` at the owner of one of the tenant's tunnels; on a stale-owner refusal, at
        the next one."""
        tunnels = self.remote_tunnels(who.tenant_id, prefer_epoch)
        for i, entry in enumerate(tunnels):
            try:
                result = call(self._client(entry.flight), self._options(who, entry, method, request))
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

    def flight_info(self, who, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return self._each_owner(who, "get_flight_info", descriptor.serialize(),
                                lambda c, o: c.get_flight_info(descriptor, o))

    def do_action(self, who, action: flight.Action) -> list:
        return self._each_owner(who, "do_action", action_bytes(action),
                                lambda c, o: [r.body.to_pybytes() for r in c.do_action(action, o)])

    def list_flights(self, who) -> list[flight.FlightInfo]:
        return self._each_owner(who, "list_flights", b"", lambda c, o: list(c.list_flights(options=o)))

    def do_get(self, who, ticket: flight.Ticket, epoch: int) -> tuple:
        """(schema, batches) of the owner's stream; the schema has arrived when this returns."""
        def call(client, options):
            reader = client.do_get(ticket, options)
            return reader, reader.schema  # the owner's refusal arrives with the schema
        reader, schema = self._each_owner(who, "do_get", ticket.ticket, call, prefer_epoch=epoch)
        return schema, _relay(reader)

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
