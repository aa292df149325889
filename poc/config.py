"""Defaults and configuration files: one place, shared by the CLI, notebooks and tests."""

from __future__ import annotations

import dataclasses
import logging
import random
import resource
from dataclasses import dataclass
from pathlib import Path

import yaml

# The tunnel's limits have their one home in the protocol core; here for the command line and the workbook.
from .tunnel.limits import (INITIAL_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, MAX_STREAMS,  # noqa: F401
                            MAX_WINDOW_BYTES, UNSOLICITED_PER_S)
from .tunnel.messages import TRACE_ID

WS_PORT = 8443
FLIGHT_PORT = 8815
HTTP_PORT = 8080
DIRECT_PORT = 8816
FLIGHT_TUNNEL_PORT = 8445  # the Flight tunnel's (docs/protocol.md §13)
FLIGHT_TUNNEL_WINDOW_BYTES = 1 << 20  # a Flight tunnel call's HTTP/2 window at the gateway: a stream's read-ahead
FLIGHT_TUNNEL_CHANNELS = 4  # a connector's connections for a Flight tunnel's data calls
HEARTBEAT_S = 60.0
OFFLINE_AFTER_S = 120.0
DELAY_MS = (200.0, 250.0)
REQUEST_TIMEOUT_S = 60.0
BATCH_BYTES = 2 * 1024 * 1024
FRAME_ALLOCATORS = ("jemalloc", "mimalloc", "system")  # gateway --frame-allocator (poc.transports.memory)
FRAME_ALLOCATOR = "jemalloc"
MAX_QUERY_BYTES = 64 * 1024  # the text of one SQL query, at the gateway and the connector
MAX_RESULT_BYTES = 1 << 30  # connector --max-result-bytes: the IPC bytes one query may send
QUERY_TIMEOUT_S = 60.0  # connector --query-timeout-s
QUERY_MEMORY_MB = 1024  # connector --query-memory-mb: DuckDB's memory_limit
DB_CONNECTIONS = 8  # connector --db-connections: connections to each database at once
COMPRESS_BELOW_MBPS = 1000.0  # connector --compression auto: compress on links that drain slower than this
MAX_BUFFERED_BYTES = 2 * 1024**3  # gateway-wide: the sum of open streams' windows
TENANT_BUFFER_SHARE = 0.5  # --max-tenant-buffered-bytes by default: this part of --max-buffered-bytes
MAX_CALLS_PER_TENANT = 256  # Flight and HTTP calls one tenant may have in progress at the gateway at once
MAX_LINKS_PER_TENANT = 8  # tunnels one tenant may hold on one gateway (--max-links-per-tenant)
MAX_PENDING_TUNNELS = 256  # tunnels open and not registered yet, at once: what strangers may hold
TUNNEL_RCVBUF_BYTES = 512 * 1024  # SO_RCVBUF of a near tunnel's socket at the gateway (docs/results.md)
GIL_SWITCH_MS = 1.0  # the gateway's sys.setswitchinterval, in ms (Python's default: 5)
HTTP_MAX_CONNECTIONS = 512  # connections the HTTP port holds at once; more get 503 (--max-http-connections)
HTTP_REQUEST_DEADLINE_S = 10.0  # a request's headers and body must arrive within this (--http-request-deadline-s)
HTTP_MAX_BODY_BYTES = 128 * 1024  # a request body (POST /v1/query)
TICKET_TTL_S = 300.0
REBALANCE_S = 10.0  # --registry: a replica compares its tunnels with its share this often
REGISTRY_TTL_S = 10.0  # --registry: a tunnel entry lives this long unless its gateway renews it (every third)
REGISTER_TIMEOUT_S = 10.0
RESUME_WINDOW_S = 30.0  # how long a dataset's stream cut off with its tunnel waits for the connector (protocol §6a)
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
WS_IMPLS = ("picows", "websockets")
WS_IMPL = "picows"  # faster by the benchmark (docs/results.md); websockets stays supported and tested


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_path(path: str | Path) -> Path:
    """A relative path is taken from the project's root, so notebooks opened in notebooks/ write to the
    same outputs/ as papermill and the CLI."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one (every tunnel is a socket); return the limit in force.
    A limit that cannot be raised is logged and returned as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logging.getLogger("poc").warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


class ConfigError(ValueError):
    """A configuration file or option is wrong; the message says which and how."""


@dataclass(frozen=True)
class TenantCredentials:
    tenant_id: str
    connector_token: str
    client_token: str

    def __repr__(self) -> str:  # tokens never reach logs
        return f"TenantCredentials(tenant_id={self.tenant_id!r})"


def valid_connector_id(value: str) -> bool:
    """A connector id as --connector-id takes it: 1-120 printable ASCII characters, no spaces (a tunnel
    registers as ID/POSITION, within protocol.md §2's 128)."""
    return len(value) <= 120 and TRACE_ID.fullmatch(value) is not None


def load_tenants(path: str | Path) -> dict[str, TenantCredentials]:
    """Read the tenants YAML file: `tenants: {id: {connector_token, client_token}}`."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read tenants file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"tenants file {path} is not valid YAML: {exc}") from None
    tenants = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise ConfigError(f"tenants file {path} must have a non-empty 'tenants:' mapping")
    result = {}
    for tenant_id, entry in tenants.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"tenants file {path}: tenant {tenant_id!r} must be a mapping")
        tokens = {}
        for key in ("connector_token", "client_token"):
            value = entry.get(key)
            if not isinstance(value, str) or len(value) < 8:
                raise ConfigError(f"tenants file {path}: tenant {tenant_id!r} needs a {key} of at least 8 characters")
            tokens[key] = value
        result[str(tenant_id)] = TenantCredentials(str(tenant_id), **tokens)
    owners: dict[str, str] = {}
    for tenant in result.values():  # a client token names exactly one tenant
        other = owners.setdefault(tenant.client_token, tenant.tenant_id)
        if other != tenant.tenant_id:
            raise ConfigError(f"tenants file {path}: tenants {other!r} and {tenant.tenant_id!r} have the same "
                              "client_token; each client token must belong to one tenant")
    return result


def write_tenants(path: str | Path, tenants: dict[str, TenantCredentials]) -> Path:
    """Write a tenants file that `load_tenants` reads back."""
    path = Path(path)
    doc = {"tenants": {t.tenant_id: {"connector_token": t.connector_token, "client_token": t.client_token}
                       for t in tenants.values()}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def make_tenants(count: int, seed: int | None = None) -> dict[str, TenantCredentials]:
    """Tenants `tenant_001`… with random tokens, for experiments and tests."""
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    def token() -> str:
        return "%032x" % rng.getrandbits(128)
    return {f"tenant_{i:03d}": TenantCredentials(f"tenant_{i:03d}", token(), token()) for i in range(1, count + 1)}


def parse_delay(text: str) -> tuple[float, float]:
    """'200-250' → (200.0, 250.0); '0' → (0.0, 0.0). Milliseconds."""
    parts = str(text).split("-")
    try:
        low, high = (float(parts[0]), float(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 0 <= low <= high:
        raise ConfigError(f"delay must be MS or LOW-HIGH milliseconds with 0 <= LOW <= HIGH, got {text!r}")
    return low, high


def extraction_delay_s(delay_ms: tuple[float, float], rng: random.Random = random) -> float:
    """The simulated extraction delay before a transfer (the seed's 200–250 ms): uniform in the range, seconds."""
    low, high = delay_ms
    return rng.uniform(low, high) / 1000 if high > 0 else 0.0


def params_from_yaml(cls, path: str | Path, **overrides):
    """Build a parameters dataclass from a YAML file; unknown keys are an error that lists the known ones."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(doc) - known - {"notebook", "title", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown parameters {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: v for k, v in doc.items() if k in known}, **overrides)
