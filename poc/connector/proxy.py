"""The connector's way out of a network that only lets an HTTP proxy through: HTTP CONNECT, with Basic credentials.

Which proxy a gateway URL goes through is decided here, once per URL, and handed to every transport's library
explicitly, so that all transports agree: `--proxy http://[USER@]HOST:PORT` with the password from
POC_PROXY_PASSWORD, or else the usual variables — `http_proxy`/`HTTP_PROXY` for ws://, `https_proxy`/
`HTTPS_PROXY` for wss://, flight:// and flight+tls:// — with `no_proxy`/`NO_PROXY` honoured. A password is taken
only from the environment, never from the command line, and never written to a log (`Proxy.shown`).
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..config import ConfigError

PASSWORD_VARIABLE = "POC_PROXY_PASSWORD"


@dataclass(frozen=True)
class Proxy:
    url: str  # http://[user[:password]@]host:port, for the libraries only
    shown: str  # http://[user@]host:port: what logs and errors name

    def __repr__(self) -> str:
        return f"Proxy({self.shown!r})"


def _parse(url: str, password: str | None, origin: str) -> Proxy:
    """A proxy URL checked: http://, a host, a port; `password` (if any) joins its user."""
    if "://" not in url:
        url = f"http://{url}"  # as curl and urllib read a bare HOST:PORT
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"{origin} must be http://[USER@]HOST:PORT (HTTP CONNECT), got {_hide(url)!r}")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    secret = urllib.parse.unquote(parts.password) if parts.password is not None else password
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown = f"http://{urllib.parse.quote(user, safe='') + '@' if user else ''}{host}:{port}"
    if user is None:
        return Proxy(f"http://{host}:{port}", shown)
    credentials = urllib.parse.quote(user, safe="") + (":" + urllib.parse.quote(secret, safe="") if secret else "")
    return Proxy(f"http://{credentials}@{host}:{port}", shown)


def _hide(url: str) -> str:
    """`url` without the password its user part may carry."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def from_option(option: str, environ: dict[str, str]) -> Proxy:
    """--proxy: http://[USER@]HOST:PORT; the password, if the proxy needs one, from POC_PROXY_PASSWORD."""
    if urllib.parse.urlsplit(option if "://" in option else f"http://{option}").password is not None:
        raise ConfigError(f"--proxy must not carry a password (a command line is visible to every user of the "
                          f"machine): give it in {PASSWORD_VARIABLE}")
    return _parse(option, environ.get(PASSWORD_VARIABLE) or None, "--proxy")


def for_gateway(gateway_url: str, explicit: Proxy | None) -> Proxy | None:
    """The proxy a link to `gateway_url` goes through: --proxy if given; else the environment's for the URL's
    scheme, unless no_proxy names the gateway's host; None: a direct connection."""
    if explicit is not None:
        return explicit
    scheme = urllib.parse.urlsplit(gateway_url).scheme
    wanted = urllib.request.getproxies().get("http" if scheme == "ws" else "https")
    host = urllib.parse.urlsplit(gateway_url).hostname or ""
    if not wanted or urllib.request.proxy_bypass(host):
        return None
    return _parse(wanted, None, f"the {'http' if scheme == 'ws' else 'https'}_proxy variable")
