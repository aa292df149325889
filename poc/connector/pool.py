"""The connector's tunnels: it keeps `cfg.tunnels` registered links ("slots"), each to a different gateway of
`cfg.gateways` while there are enough, all with one connector_id; each slot reconnects with backoff, moving on to
the next gateway. A goaway retires a slot once its replacement is registered and starts that replacement at once,
towards the gateway it suggests."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random

from ..sources import Source
from ..transports.base import TunnelTransport
from ..tunnel import CloseCode, TunnelClosed
from ..tunnel.params import MAX_PARAMS
from .config import ConnectorConfig, RegistrationRefused, Replaced
from .dial import LINK_LOST, dial, targets
from .proxy import PASSWORD_VARIABLE
from .metrics import ConnectorMetrics
from .serving import Serving
from .session import Session, SessionHooks

log = logging.getLogger("poc.connector")


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so returning connectors spread out."""
    base = min(cap, initial * 2 ** attempt)
    return base / 2 + rng.uniform(0, base / 2)


class _Ended(Exception):
    """A session's link ended with an error (its cause); carries the session."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session


class Connector:
    """The connector: its sources (served through `serving`) and its pool of tunnels. `run(stop)` keeps them."""

    def __init__(self, cfg: ConnectorConfig, sources: dict[str, Source]) -> None:
        self.cfg = cfg
        self.metrics = ConnectorMetrics()
        self.serving = Serving(cfg, sources, self.metrics)
        self.session_id: str | None = None  # of the newest registration
        self.on_registered = None  # called with the session id at each registration
        self._registered: set[int] = set()  # slots registered on a live link right now
        self._in_use: dict[int, str] = {}  # slot → the gateway it dials or holds
        self._leaving: set[str] = set()  # gateways that sent goaway on a link still open
        self._slots: dict[int, asyncio.Task] = {}
        self._positions: dict[int, int] = {}  # slot → its position, the smallest free: part of its connector_id
        self._retiring: set[asyncio.Task] = set()
        self._first: dict[int, str] = {}  # slot → the gateway a goaway suggested for its first attempt
        self._replacing: dict[int, Session] = {}  # slot → the session it takes over from
        self._next_slot = itertools.count()
        self._offset = random.random()  # connectors given the same gateways spread over them
        self._hooks = SessionHooks(registered=self._registered_on, goaway=self._on_goaway)

    @property
    def names(self) -> list[str]:
        """Every dataset this connector serves."""
        return self.serving.names

    @property
    def online(self) -> bool:
        """Registered on at least one live link right now."""
        return bool(self._registered)

    @property
    def live_tunnels(self) -> int:
        return len(self._registered)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the tunnels until `stop` is set; raise RegistrationRefused (or Replaced) when a gateway says
        retrying cannot help."""
        for _ in range(max(1, self.cfg.tunnels)):
            self._start_slot(stop)
        try:
            while self._slots:
                done, _ = await asyncio.wait(set(self._slots.values()), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
        finally:
            for task in self._slots.values():
                task.cancel()
            await asyncio.gather(*self._slots.values(), return_exceptions=True)

    def _start_slot(self, stop: asyncio.Event, first: str | None = None, replaces: Session | None = None) -> None:
        """A new tunnel; `first`: the gateway to try first; `replaces`: a session that said goaway, closed
        by this side once the new tunnel is registered and its own streams have ended."""
        slot = next(self._next_slot)
        if first is not None:
            self._first[slot] = first
        if replaces is not None:
            self._replacing[slot] = replaces
        taken = set(self._positions.values())
        self._positions[slot] = next(p for p in itertools.count() if p not in taken)
        task = asyncio.get_running_loop().create_task(self._slot(slot, stop))
        self._slots[slot] = task
        task.add_done_callback(lambda t, slot=slot: self._slot_ended(slot, t))

    def _slot_ended(self, slot: int, task: asyncio.Task) -> None:
        self._positions.pop(slot, None)
        if task.cancelled() or task.exception() is None:
            self._slots.pop(slot, None)  # retired (goaway) or stopped; a failed slot stays for run() to raise

    def registration_id(self, slot: int) -> str:
        """The connector_id a slot registers with: the connector's id and the slot's position, so that each
        of its tunnels is distinct even when two land on one gateway (behind a load balancer), and a
        restarted connector's tunnel replaces the one it had at that position (protocol.md §2)."""
        return f"{self.cfg.connector_id}/{self._positions.get(slot, 0)}"

    def _choose(self, slot: int, attempt: int, gateways: list[str]) -> str:
        """The gateway for a slot's next link: one no other slot uses and that did not say goaway, in turn."""
        taken = {url for other, url in self._in_use.items() if other != slot} | self._leaving
        free = [url for url in gateways if url not in taken] or [url for url in gateways
                                                                  if url not in self._leaving] or gateways
        return free[(int(self._offset * len(free)) + slot + attempt) % len(free)]

    async def _slot(self, slot: int, stop: asyncio.Event) -> None:
        """One tunnel: connect, serve, reconnect with backoff (to the next gateway); return once retired."""
        attempt = 0
        while not stop.is_set():
            url = self._in_use[slot] = self._first.pop(slot, None) or self._choose(
                slot, attempt, await targets(self.cfg.gateways, self.cfg.proxy_for))
            session: Session | None = None
            try:
                session = await self._session(stop, url, slot)
            except RegistrationRefused:
                raise
            except _Ended as ended:
                session = ended.session
                self._link_lost(url, ended.__cause__)
            except Exception as exc:
                self._link_lost(url, exc)
            finally:
                self._registered.discard(slot)
                self.metrics.registered.set(len(self._registered))
                if session is not None and session.goaway:
                    self._leaving.discard(url)
            if stop.is_set():
                return
            if session is not None and session.goaway:
                self._in_use.pop(slot, None)
                log.info("link to %s closed after its goaway; its replacement took over", url)
                return
            self.metrics.reconnects.inc()
            attempt = 0 if session is not None and session.registered else attempt + 1
            delay = backoff_delay(attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
            log.info("reconnecting in %.2f s (attempt %d)", delay, attempt + 1)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _link_lost(self, url: str, exc: BaseException | None) -> None:
        """Log why a link ended; raise what retrying cannot cure."""
        if isinstance(exc, TunnelClosed):
            if exc.code == CloseCode.REPLACED:
                raise Replaced(f"gateway closed the link: {exc.reason}") from None
            if exc.code == CloseCode.TENANT_REMOVED:
                raise RegistrationRefused(f"gateway closed the link: {exc.reason}") from None
            log.warning("link to %s lost: %s", url, exc)
        elif isinstance(exc, LINK_LOST):
            proxy = self.cfg.proxy_for(url)
            if proxy is not None and "407" in str(exc):
                log.warning("proxy %s refused this connector's credentials (407 Proxy Authentication Required) for "
                            "%s: check the user in --proxy (or the proxy variable) and %s", proxy.shown, url,
                            PASSWORD_VARIABLE)
            elif proxy is not None and "missing selected ALPN" in str(exc):
                log.warning("link to %s through proxy %s failed: the proxy inspects TLS and does not speak HTTP/2, "
                            "which the Flight tunnel needs; behind this proxy use the WebSocket tunnel (wss://) "
                            "(%s)", url, proxy.shown, exc)
            else:
                log.warning("link to %s lost%s: %s", url, f" (through proxy {proxy.shown})" if proxy else "",
                            exc or type(exc).__name__)
        elif exc is not None:  # whatever else ended the session, a new link may cure it: reconnect, never exit
            log.error("session with %s failed", url, exc_info=exc)

    async def _session(self, stop: asyncio.Event, url: str, slot: int) -> Session:
        """One link from dial to close; returns its session when the link ended cleanly, else raises _Ended
        (carrying the session and, as its cause, what ended it) or what the dial raised."""
        cfg = self.cfg
        async with dial(url, cfg) as transport:
            endpoint = transport.endpoint
            await transport.call(endpoint.register, cfg.tenant_id, cfg.token, self.names,
                                 self.registration_id(slot), cfg.codecs, cfg.sql_dialect,
                                 MAX_PARAMS if cfg.sql_dialect else None, True)
            session = Session(cfg, self.serving, self.metrics, transport, self._hooks, url, slot, stop)
            stopper = asyncio.get_running_loop().create_task(self._close_on(stop, transport))
            try:
                await session.serve()
            except RegistrationRefused:
                raise
            except Exception as exc:
                raise _Ended(session) from exc
            finally:
                stopper.cancel()
        return session

    @staticmethod
    async def _close_on(stop: asyncio.Event, transport: TunnelTransport) -> None:
        await stop.wait()
        await transport.close(1001, "connector shutting down")

    # -- what sessions tell the pool (SessionHooks)

    def _registered_on(self, session: Session, session_id: str) -> None:
        """A slot registered: count it, retire the session it replaces, if any, and say so."""
        self.session_id = session_id
        self._registered.add(session.slot)
        self.metrics.registered.set(len(self._registered))
        old = self._replacing.pop(session.slot, None)
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.retire())
            self._retiring.add(task)  # held until done: a task nothing refers to may be collected
            task.add_done_callback(self._retiring.discard)
        if self.on_registered:
            self.on_registered(session_id)

    def _on_goaway(self, session: Session, reason: str, prefer: str | None) -> None:
        """A gateway asks this link to move (it drains, or holds more than its share): start a tunnel to
        another gateway now — the one it suggests if this connector was given it — and close this link once
        that one is registered and this link's streams have ended."""
        log.info("gateway %s says goaway (%s): opening a tunnel to %s", session.url, reason,
                 prefer if prefer in self.cfg.gateways else "another gateway")
        usable = prefer in self.cfg.gateways and prefer not in self._in_use.values()  # not where a tunnel is
        if prefer is not None and not usable and all(g == session.url for g in self.cfg.gateways):
            log.info("staying on %s: it asked this link to move, but it is the only gateway this connector "
                     "knows", session.url)
            session.goaway = False  # a rebalancing request this connector cannot follow; drains close the link
            return
        self._leaving.add(session.url)
        self._start_slot(session.stop, prefer if usable else None, replaces=session)
