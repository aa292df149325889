"""Dialling out: where a link may go (each --gateway, or one target per address of a name that resolves to
several), and the link to one, whatever transport its URL's scheme names. Errors of the transports' libraries
that mean "this link is gone, try again" are named here, once (`LINK_LOST`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import urllib.parse

import pyarrow as pa
from picows import WSError
from python_socks import ProxyError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from .. import config
from ..transports.websocket import WebSocketLink
from ..tunnel import CloseCode, ConnectorEndpoint
from .config import ConnectorConfig, RefusedForNow

LINK_LOST = (OSError, InvalidHandshake, asyncio.TimeoutError, WSError, ProxyError, RefusedForNow,
             pa.ArrowException)


def names_several(url: str) -> bool:
    """Whether a ws[s]:// URL's host name resolves to several addresses (several replicas behind one name)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        return False
    try:
        return len({info[4][0] for info in socket.getaddrinfo(parsed.hostname, parsed.port or 443,
                                                             type=socket.SOCK_STREAM)}) > 1
    except OSError:
        return False


async def targets(gateways: list[str], proxied=lambda url: None) -> list[str]:
    """Where a link may go, resolved now: each --gateway URL, or, for a ws[s]:// URL whose name resolves to
    several addresses (one name for several replicas), one target per address, written URL#ADDRESS (the link
    keeps the name for TLS and the Host header and connects to that address). A URL reached through a proxy
    (`proxied(url)` names one) is not resolved here: the proxy resolves it."""
    found: list[str] = []
    loop = asyncio.get_running_loop()
    for url in gateways:
        parsed = urllib.parse.urlsplit(url)
        addresses: list[str] = []
        if parsed.scheme in ("ws", "wss") and parsed.hostname and proxied(url) is None:
            try:
                infos = await loop.getaddrinfo(parsed.hostname, parsed.port or 443, type=socket.SOCK_STREAM)
                addresses = list(dict.fromkeys(info[4][0] for info in infos))
            except OSError:
                pass  # the dial says why
        found += [f"{url}#{address}" for address in addresses] if len(addresses) > 1 else [url]
    return found


async def _socket_to(url: str, address: str) -> socket.socket:
    """A TCP socket connected to `address` at the URL's port."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "wss" else 80)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), 10)
    except BaseException:
        sock.close()
        raise
    return sock


def _ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=ca_file)


@contextlib.asynccontextmanager
async def dial(target: str, cfg: ConnectorConfig):
    """The link to a gateway; the URL's scheme picks Flight or WebSocket, --ws-impl the WebSocket library;
    a target URL#ADDRESS connects to that address. Closed (1001) on leaving, if still open."""
    url, _, address = target.partition("#")
    proxy = cfg.proxy_for(url)
    through = proxy.url if proxy is not None else None
    sock = await _socket_to(url, address) if address and proxy is None else None
    if url.startswith(("ws://", "wss://")) and cfg.ws_impl == "websockets":
        async with connect(url, compression=None, proxy=through, ssl=_ssl_context(url, cfg.ca_file), sock=sock,
                           max_size=config.MAX_FRAME_BYTES, ping_interval=cfg.heartbeat_s,
                           ping_timeout=cfg.heartbeat_s, write_limit=1024 * 1024, open_timeout=10) as ws:
            link = WebSocketLink(ws, ConnectorEndpoint())
            link.bound_unsent()
            yield link
        return
    if url.startswith(("flight://", "flight+tls://")):
        from ..transports.flight_connector import dial_flight

        ca = open(cfg.ca_file, "rb").read() if cfg.ca_file else None
        link = await dial_flight(url, ConnectorEndpoint, cfg.tenant_id, cfg.token, ca, config.FLIGHT_TUNNEL_CHANNELS,
                                 through, cfg.heartbeat_s)
    else:
        from ..transports.picows_ws import dial_picows

        link = await dial_picows(url, ConnectorEndpoint, _ssl_context(url, cfg.ca_file), cfg.heartbeat_s,
                                 config.MAX_FRAME_BYTES, sock, through)
    try:
        yield link
    finally:
        if link.closed is None:
            await link.close(CloseCode.GOING_AWAY, "connector shutting down")
