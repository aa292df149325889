"""A connector's configuration, and how its registrations end when they cannot go on."""

from __future__ import annotations

import hashlib
import importlib.util
import socket
from dataclasses import dataclass, field

from .. import config
from ..catalog import available_codecs
from .proxy import Proxy


class RegistrationRefused(Exception):
    """The gateway refused the registration (bad token, bad version): retrying would not help."""


class RefusedForNow(Exception):
    """The gateway refused the registration for a reason that may pass (the tenant holds as many tunnels there
    as it allows: code too_many_links, close 4008): back off and retry."""


RETRY_LATER = {"too_many_links"}  # registration refusals a later attempt may cure (protocol.md §9)


class Replaced(Exception):
    """A newer connector registered for this tenant (close 4002): reconnecting would only fight it."""


@dataclass
class ConnectorConfig:
    gateway: str  # the first (or only) gateway
    tenant_id: str
    token: str
    delay_ms: tuple[float, float] = config.DELAY_MS
    heartbeat_s: float = config.HEARTBEAT_S
    backoff_initial_s: float = config.BACKOFF_INITIAL_S
    backoff_max_s: float = config.BACKOFF_MAX_S
    ca_file: str | None = None
    ws_impl: str = config.WS_IMPL
    more_gateways: tuple[str, ...] = ()  # replicas of the same service (--gateway given several times)
    tunnels: int = 1  # live tunnels kept at once, each to a different gateway while there are enough
    connector_id: str = ""  # "": one derived from this host and tenant (default_connector_id)
    compression: str = "auto"  # auto | always | off (--compression)
    compress_below_mbps: float = config.COMPRESS_BELOW_MBPS
    sql: bool = True  # answer SQL queries (protocol 1.5) over the datasets (--no-sql: off)
    max_result_bytes: int = config.MAX_RESULT_BYTES
    query_timeout_s: float = config.QUERY_TIMEOUT_S
    query_memory_mb: int = config.QUERY_MEMORY_MB
    db_connections: int = config.DB_CONNECTIONS  # per database (--sources): more requests wait for one
    proxies: dict[str, Proxy] = field(default_factory=dict)  # gateway URL → its proxy, decided once at start;
    # a URL not named goes direct (poc.connector.proxy.for_gateway decides)

    def proxy_for(self, target: str) -> Proxy | None:
        """The proxy a link to `target` (a gateway URL, or URL#ADDRESS) goes through; None: direct."""
        return self.proxies.get(target.partition("#")[0])

    @property
    def sql_dialect(self) -> str | None:
        """What register says about SQL (protocol 1.5): "duckdb" when queries are answered, else None."""
        return "duckdb" if self.sql and importlib.util.find_spec("duckdb") is not None else None

    @property
    def codecs(self) -> list[str]:
        """What register offers (protocol 1.4): the codecs pyarrow can write, none with --compression off."""
        return [] if self.compression == "off" else available_codecs()

    def __post_init__(self) -> None:
        self.connector_id = self.connector_id or default_connector_id(self.tenant_id)

    @property
    def gateways(self) -> list[str]:
        return [self.gateway, *(g for g in self.more_gateways if g != self.gateway)]

    def __repr__(self) -> str:  # the token never reaches logs
        return f"ConnectorConfig(gateways={self.gateways!r}, tenant_id={self.tenant_id!r}, tunnels={self.tunnels})"


def default_connector_id(tenant_id: str) -> str:
    """Stable for one tenant on one host: a connector restarted there replaces its own old links (which may
    still look alive to the gateway), while connectors of the tenant on other hosts add theirs."""
    digest = hashlib.sha256(f"{socket.gethostname()}\0{tenant_id}".encode()).hexdigest()
    return f"h-{digest[:16]}"
