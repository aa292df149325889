"""The connectors' side of the gateway: the tunnel endpoints (WebSocket on websockets or picows, Arrow Flight), each
tunnel from its register to its close, the links it registers (poc.gateway.registry), links taken out of service,
and the heartbeat watch. Calls reach the links through poc.gateway.bridge."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import ssl
import time

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ..transports.base import TunnelTransport, bound_receive_queue
from ..transports.websocket import WebSocketLink
from ..tunnel import HEADER, CloseCode, GatewayEndpoint, TunnelClosed
from ..tunnel.limits import TokenBucket
from .. import errors
from ..tunnel.messages import PROTOCOL_VERSION, Error, Register
from .link import Parked, TenantLink
from .sinks import StreamItem
from .metrics import GatewayMetrics, close_label
from .registry import TenantRegistry
from .settings import GatewayConfig
from .shares import BufferBudget

log = logging.getLogger("poc.gateway")
PEER_RETRY_S = 1.0  # with replicas, how often a stream waiting to resume asks whether another replica can


class Tunnels:
    """Runs on the gateway's loop. `replica` (poc.gateway.replica), when set, publishes what registers here and
    withdraws what closes."""

    def __init__(self, cfg: GatewayConfig, registry: TenantRegistry, budget: BufferBudget,
                 metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.registry = registry
        self.budget = budget
        self.metrics = metrics
        self.replica = None
        self.peers = None  # with replicas, poc.gateway.peer_resume.PeerResumer: streams resume at another replica
        self.ports: dict[str, int] = {}
        self._ws_server: Server | None = None
        self._flight_server = None
        self._tasks: set[asyncio.Task] = set()
        self._epochs: dict[str, int] = {}  # without a registry: each tenant's registrations, counted here
        self._unregistered = 0  # tunnels open that have not registered yet (--max-pending-tunnels)

    async def listen(self, ssl_context: ssl.SSLContext | None) -> None:
        """Open the tunnel ports (`ports` then names them) and start watching heartbeats."""
        cfg = self.cfg
        max_message = cfg.limits.max_frame_bytes + HEADER.size
        if cfg.ws_impl == "picows":
            from ..transports.picows_ws import PicowsLink, serve_picows

            self._ws_server = await serve_picows(self.serve, lambda: GatewayEndpoint(cfg.limits), cfg.host,
                                                 cfg.ws_port, ssl_context, max_message)
            self._stop_accepting = self._ws_server.close
            self._count(PicowsLink.KIND)
        else:
            self._ws_server = await serve(
                self._handle, cfg.host, cfg.ws_port, process_request=self._only_connect_path, ssl=ssl_context,
                compression=None, max_size=max_message, ping_interval=None, write_limit=1024 * 1024,
                close_timeout=3)
            self._stop_accepting = lambda: self._ws_server.close(close_connections=False)
            self._count(WebSocketLink.KIND)
        self.ports["ws_port"] = self._ws_server.sockets[0].getsockname()[1]
        if cfg.flight_tunnel_port is not None:
            await self._listen_flight()
        self._spawn(self._watch_heartbeats())

    async def _listen_flight(self) -> None:
        """The Flight tunnel (docs/protocol.md §13), on this loop: control calls served as every tunnel is, data
        calls by poc.gateway.data_calls."""
        from ..transports.flight_tunnel import FlightServerLink, serve_flight_tunnel
        from .data_calls import DataCalls

        cfg = self.cfg
        data = DataCalls(self.registry, self._parker)
        # Calls open at once: every tunnel's control call, every stream's data call, and room for strangers
        # refused at once. Streams are bounded per tenant by its buffer share (each reserves a window).
        max_calls = cfg.max_pending_tunnels + 2 * cfg.limits.max_streams + 256
        self._flight_server, self.ports["flight_tunnel_port"] = await serve_flight_tunnel(
            cfg.host, cfg.flight_tunnel_port, cfg.limits.max_frame_bytes + 64,
            self._tls_pair(), self._token_ok, self.serve, lambda: GatewayEndpoint(cfg.limits), data.serve, self._refused_by_header,
            max_calls, cfg.flight_tunnel_window_bytes, cfg.register_timeout_s)
        self._count(FlightServerLink.KIND)

    def _tls_pair(self) -> tuple[bytes, bytes] | None:
        """The certificate and key the Flight tunnel uses, read from --tls-cert/--tls-key; None without TLS."""
        if not self.cfg.tls:
            return None
        with open(self.cfg.tls_cert, "rb") as cert, open(self.cfg.tls_key, "rb") as key:
            return cert.read(), key.read()

    def _token_ok(self, tenant_id: str, token: str) -> bool:
        """Whether `token` is the tenant's connector token (any thread; constant time)."""
        creds = self.registry.tenants.get(tenant_id)
        expected = creds.connector_token if creds else secrets.token_hex(16)
        return hmac.compare_digest(token.encode(), expected.encode()) and creds is not None

    def _refused_by_header(self, tenant_id: str) -> bytes:
        """The `error` a Flight tunnel call gets when its headers do not carry the tenant's connector token."""
        log.warning("refused a connector for tenant %r: invalid token (Flight tunnel call)", tenant_id[:64])
        self.metrics.registrations.labels("refused").inc()
        return Error(code="unauthenticated", message=f"invalid token for tenant {tenant_id[:64]!r}").serialize().encode()

    def _count(self, kind: str) -> None:
        """poc_gateway_tunnels{transport=kind}: the registered tunnels a transport carries, read when scraped."""
        self.metrics.tunnels.labels(kind).set_function(
            lambda: sum(1 for link in self.registry.links() if link.transport.KIND == kind))

    async def close(self, deadline: float) -> None:
        """Stop accepting; let in-flight streams finish until `deadline`; close every tunnel (1001)."""
        for task in list(self._tasks):
            task.cancel()
        if self._ws_server is not None:
            self._stop_accepting()
            while time.monotonic() < deadline and any(link.streams_in_flight for link in self.registry.links()):
                await asyncio.sleep(0.05)
            for link in self.registry.links():
                self.drop(link, "gateway shutting down", CloseCode.GOING_AWAY)
            await asyncio.wait_for(self._ws_server.wait_closed(), 15)
        if self._flight_server is not None:
            await self._flight_server.stop(1.0)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _only_connect_path(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != "/connect":
            return connection.respond(404, "the tunnel endpoint is /connect\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        await self.serve(WebSocketLink(ws, GatewayEndpoint(self.cfg.limits)))

    async def serve(self, transport: TunnelTransport) -> None:
        """One tunnel from its register to its close, whatever transport carries it. However it ends — a
        close, a broken rule, a timeout or a bug — the socket is closed and the link's calls fail."""
        bound_receive_queue(transport.socket(), self.cfg.tunnel_rcvbuf_bytes)
        events = transport.events()
        link: TenantLink | None = None
        reason = "closed"
        code: int | None = None  # how the tunnel closed, when known
        close_reason = None  # set: this side must still close the socket, with `code`
        self._unregistered += 1  # counted until it registers or ends: strangers hold at most the cap of them
        pending = True
        try:
            if self.registry.draining:
                code, close_reason = CloseCode.GOING_AWAY, "gateway shutting down; connect to another gateway"
                return
            if self.cfg.max_pending_tunnels and self._unregistered > self.cfg.max_pending_tunnels:
                code, close_reason = CloseCode.TRY_AGAIN_LATER, (
                    f"{self.cfg.max_pending_tunnels} tunnels are waiting to register, the most this gateway "
                    "holds; retry later")
                return
            async with asyncio.timeout(self.cfg.register_timeout_s):
                first = await anext(events)
            pending = False
            self._unregistered -= 1
            link = await self._register(transport, first[0])
            if link is None:
                return
            async for batch in events:
                for event in batch:
                    link.handle(event)
        except TimeoutError:
            code, close_reason = CloseCode.PROTOCOL_ERROR, f"no register within {self.cfg.register_timeout_s:g} s"
        except TunnelClosed as exc:
            reason, code = str(exc) or reason, exc.code
        except StopAsyncIteration:
            pass
        except Exception:  # a bug on this side: this link ends, the gateway and every other link go on
            log.exception("link of tenant %s failed", link.tenant_id if link else "(unregistered)")
            code, close_reason = 1011, "internal error in the gateway"
        finally:
            if pending:
                self._unregistered -= 1
            await events.aclose()
            if transport.closed is not None and not isinstance(code, int):
                code = transport.closed.code
            self.metrics.tunnel_closes.labels(close_label(code)).inc()
            if close_reason is not None and transport.closed is None:
                reason = close_reason
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.close(code, close_reason), 5)
            if link is not None:
                self.registry.unregister(link)
                self._withdraw(link)
                link.fail_all(link.closing_reason or reason, self._parker())
                log.info("tenant %s session %s disconnected: %s", link.tenant_id, link.session_id,
                         link.closing_reason or reason, extra={"tenant": link.tenant_id, "session": link.session_id})

    async def _register(self, transport: TunnelTransport, event) -> TenantLink | None:
        register: Register = event.register  # the core lets nothing else come first
        token_ok = self._token_ok(register.tenant_id, register.token)
        named = getattr(transport, "tenant_id", None)  # a Flight tunnel's call names its tenant in its headers
        token_ok = token_ok and named in (None, register.tenant_id)
        if register.version.split(".")[0] != PROTOCOL_VERSION:
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "unsupported_version",
                                      f"protocol version {register.version!r} is not supported; "
                                      f"this gateway speaks {PROTOCOL_VERSION}", CloseCode.PROTOCOL_ERROR)
        if not token_ok:
            log.warning("refused a connector for tenant %r: invalid token", register.tenant_id)
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "unauthenticated",
                                      f"invalid token for tenant {register.tenant_id!r}", CloseCode.UNAUTHENTICATED)
        held = [x for x in self.registry.tenant_links(register.tenant_id)
                if x.connector_id != (register.connector_id or "") and x.closing_reason is None]
        if self.cfg.max_links_per_tenant and len(held) >= self.cfg.max_links_per_tenant:
            log.warning("refused a tunnel of tenant %s: it holds %d here, the most allowed", register.tenant_id,
                        len(held), extra={"tenant": register.tenant_id})
            self.metrics.registrations.labels("refused").inc()
            return await self._refuse(transport, "too_many_links",
                                      f"tenant {register.tenant_id!r} already holds {len(held)} tunnels on this "
                                      "gateway, the most it allows (--max-links-per-tenant); retry later",
                                      CloseCode.TOO_MANY_LINKS)
        session_id = "sess_" + secrets.token_hex(8)
        # `registered` is queued before the link can be routed to, and the link is routable before `registered`
        # is written: a client that calls as soon as its connector is registered finds it, and the requests
        # routed to it leave after `registered` (they queue behind it).
        transport.endpoint.accept(session_id, self.cfg.heartbeat_s, resume=self.cfg.resume_window_s > 0)
        link = TenantLink(register.tenant_id, session_id, list(register.datasets), transport, self.budget,
                          connector_id=register.connector_id or "")
        if self.cfg.max_requests_per_s > 0:
            link.request_rate = TokenBucket(self.cfg.max_requests_per_s)
        link.last_heartbeat = time.time()
        if self.replica is not None:
            link.lease_until = 0.0  # not served as owner before the registry has its entry
        else:
            link.epoch = self._epochs[link.tenant_id] = self._epochs.get(link.tenant_id, 0) + 1
        old = self.registry.register(link)
        await transport.call(lambda: None)  # `registered` written
        if self.replica is not None:
            await self.replica.registered(link)
        self.metrics.registrations.labels("ok").inc()
        if old is not None:
            self.metrics.registrations.labels("replaced").inc()
            self.drop(old, f"replaced by a new registration ({session_id})", CloseCode.REPLACED)
        log.info("tenant %s registered: session %s, epoch %d, datasets %s", link.tenant_id, session_id, link.epoch,
                 link.datasets,
                 extra={"tenant": link.tenant_id, "session": session_id})
        return link

    async def _refuse(self, transport: TunnelTransport, code: str, message: str, close_code: int) -> None:
        await transport.call(transport.endpoint.refuse, code, message)
        await transport.close(close_code, message)
        return None

    def drop(self, link: TenantLink, reason: str, close_code: int) -> None:
        """Take a link out of service now; its requests fail at once, the close completes in the background."""
        link.closing_reason = reason
        self.registry.unregister(link)
        self._withdraw(link)
        link.fail_all(reason, self._parker())
        self._spawn(link.transport.close(close_code, reason))

    # -- streams cut off with their tunnel (docs/protocol.md §6a)

    def _parker(self):
        """What takes the resumable streams of a link that ended: None when they fail at once (resume off, or
        the gateway is shutting down)."""
        if self.cfg.resume_window_s <= 0 or self.registry.draining:
            return None
        return self._park

    def _park(self, parked: Parked) -> None:
        parked.sink.held_until = time.monotonic() + self.cfg.resume_window_s  # its Flight call waits as long
        replay = parked.replay
        log.info("stream of %r cut off after %d rows (%s): waiting up to %g s for the connector to resume it",
                 replay.dataset, replay.rows, parked.reason, self.cfg.resume_window_s,
                 extra={"tenant": parked.tenant_id, "request_id": replay.trace_id})
        self._spawn(self._resume(parked))

    async def _resume(self, parked: Parked) -> None:
        """Hand the stream to the tenant's next live link here as soon as there is one, or with replicas to the
        replica that holds one (every PEER_RETRY_S), within the window; else it fails, never short. Its
        reservation is held meanwhile (and, resumed at another replica, until the relay ends)."""
        deadline = time.monotonic() + self.cfg.resume_window_s
        outcome = "expired"
        refused = ""  # why another replica could not resume it, last time it was asked
        ask_peers_at = time.monotonic()
        try:
            while not parked.sink.cancelled and not self.registry.draining:
                link = self.registry.local(parked.tenant_id)
                if link is not None and link.adopt(parked):
                    outcome = "resumed"
                    log.info("stream of %r resumed from row %d on session %s", parked.replay.dataset,
                             parked.replay.rows, link.session_id,
                             extra={"tenant": parked.tenant_id, "request_id": parked.replay.trace_id})
                    return
                if self.peers is not None and time.monotonic() >= ask_peers_at:
                    ask_peers_at = time.monotonic() + PEER_RETRY_S
                    answer = await self.peers.resume(parked, lambda: self.budget.release(parked.tenant_id,
                                                                                         parked.reserved))
                    if answer is True:
                        outcome = "resumed"
                        return
                    refused = answer or refused
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            outcome = "cancelled" if parked.sink.cancelled else "expired"
        finally:
            self.metrics.streams_resumed.labels(outcome).inc()
            if outcome != "resumed":
                self.budget.release(parked.tenant_id, parked.reserved)
                parked.sink.held_until = 0.0
                parked.sink.put(StreamItem.ERROR, errors.Unavailable(
                    f"connector of tenant {parked.tenant_id} disconnected: {parked.reason}; it did not come back "
                    f"within --resume-window-s {self.cfg.resume_window_s:g} s to resume the stream"
                    + (f" (another replica could not resume it: {refused})" if refused else "")))
                parked.sink.close()

    def _withdraw(self, link: TenantLink) -> None:
        if self.replica is not None:
            self.replica.withdraw(link)

    async def _watch_heartbeats(self) -> None:
        interval = max(0.05, min(5.0, self.cfg.offline_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for link in self.registry.links():
                if now - link.last_seen > self.cfg.offline_after_s:
                    log.warning("tenant %s silent for %.0f s: offline", link.tenant_id, now - link.last_seen)
                    self.drop(link, f"no heartbeat for {self.cfg.offline_after_s:.0f} s", CloseCode.HEARTBEAT_TIMEOUT)
