"""Client authentication for Flight (bearer token per tenant) and tickets signed by the server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight

from .config import TICKET_TTL_S, TenantCredentials
from .tunnel.messages import valid_dataset_name


class TenantTokens:
    """Finds the tenant of a token in time that does not grow with the number of tenants: the lookup is keyed by
    the token's SHA-256 (so its timing says nothing about the token's bytes), and the token found is then
    compared in constant time."""

    def __init__(self, tenants: dict[str, TenantCredentials], field: str) -> None:
        self._by_digest = {hashlib.sha256(getattr(t, field).encode()).digest(): (t.tenant_id, getattr(t, field).encode())
                           for t in tenants.values()}

    def tenant_for(self, token: str) -> str | None:
        """The tenant whose token this is, or None."""
        given = token.encode()
        entry = self._by_digest.get(hashlib.sha256(given).digest())
        return entry[0] if entry is not None and hmac.compare_digest(given, entry[1]) else None


REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")


PEER_HEADER = "x-poc-peer"
PEER_TTL_S = 30.0


class PeerCredentials:
    """What one gateway replica asserts to another when it forwards a client's call (`--registry`): the
    tenant, the epoch of the tunnel the call is for, the replica it is meant for, the Flight method and a
    SHA-256 of the call's request (ticket, descriptor or action), and an expiry, with an HMAC-SHA256 under the
    replicas' shared peer secret (POC_PEER_SECRET). One cannot be replayed for another call, at another
    replica, or after PEER_TTL_S (docs/security.md)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def make(self, tenant_id: str, epoch: int, gateway_id: str, method: str, request: bytes,
             ttl_s: float = PEER_TTL_S) -> str:
        body = json.dumps({"t": tenant_id, "p": epoch, "g": gateway_id, "m": method,
                           "r": hashlib.sha256(request).hexdigest(), "x": round(time.time() + ttl_s, 3)},
                          separators=(",", ":")).encode()
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()
        return (base64.urlsafe_b64encode(body) + b"." + base64.urlsafe_b64encode(mac)).decode()

    def check(self, value: str, gateway_id: str, method: str) -> tuple[str, int, str]:
        """(tenant, epoch, request digest) of a valid assertion meant for `gateway_id` and `method`;
        FlightUnauthenticatedError else. The handler compares the digest with the call's request."""
        try:
            body_b64, mac_b64 = value.encode().split(b".")
            body, mac = base64.urlsafe_b64decode(body_b64), base64.urlsafe_b64decode(mac_b64)
        except ValueError:
            raise flight.FlightUnauthenticatedError("malformed peer credentials") from None
        if not hmac.compare_digest(mac, hmac.new(self._secret, body, hashlib.sha256).digest()):
            raise flight.FlightUnauthenticatedError("peer credentials are not valid")
        claims = _claims(body, {"t": str, "p": int, "g": str, "m": str, "r": str, "x": (int, float)})
        if claims is None:
            raise flight.FlightUnauthenticatedError("malformed peer credentials")
        if claims["g"] != gateway_id:
            raise flight.FlightUnauthenticatedError("peer credentials are for another gateway")
        if claims["m"] != method:
            raise flight.FlightUnauthenticatedError(f"peer credentials are for another call ({claims['m'][:40]})")
        if time.time() > claims["x"]:
            raise flight.FlightUnauthenticatedError("peer credentials expired")
        return claims["t"], claims["p"], claims["r"]


PEER_METHODS = {flight.FlightMethod.GET_FLIGHT_INFO: "get_flight_info", flight.FlightMethod.DO_GET: "do_get",
                flight.FlightMethod.DO_ACTION: "do_action", flight.FlightMethod.LIST_FLIGHTS: "list_flights"}


def request_bytes(method: str, args: tuple) -> bytes:
    """The request of a call as peer credentials bind it (the forwarding replica makes them the same way)."""
    if method in ("get_flight_info", "get_schema"):
        return args[0].serialize()
    if method == "_do_get":
        return args[0].ticket
    if method == "do_action":
        return action_bytes(args[0])
    if method == "list_flights":
        return bytes(args[0] or b"")
    return b""


def action_bytes(action: flight.Action) -> bytes:
    return action.type.encode() + b"\0" + (action.body.to_pybytes() if action.body is not None else b"")


def request_digest(request: bytes) -> str:
    """What peer credentials bind a forwarded call's request to."""
    return hashlib.sha256(request).hexdigest()


class TenantCalls:
    """Calls each tenant has in progress on a server's Flight and HTTP ports, and the most it may have: a
    tenant that holds its share of threads and connections (calls whose streams it does not read) cannot take
    those of others (docs/security.md). 0: no cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_tenant: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, tenant_id: str) -> None:
        """Count one call in; FlightUnavailableError when the tenant already has `limit` in progress."""
        with self._lock:
            held = self._by_tenant.get(tenant_id, 0)
            if self.limit and held >= self.limit:
                raise flight.FlightUnavailableError(
                    f"tenant {tenant_id} has {held} calls in progress, the most this server takes at once "
                    "(--max-calls-per-tenant); retry when one ends")
            self._by_tenant[tenant_id] = held + 1

    def leave(self, tenant_id: str) -> None:
        with self._lock:
            held = self._by_tenant.get(tenant_id, 0) - 1
            if held > 0:
                self._by_tenant[tenant_id] = held
            else:
                self._by_tenant.pop(tenant_id, None)

    def in_progress(self, tenant_id: str) -> int:
        return self._by_tenant.get(tenant_id, 0)


class TenantAuthMiddleware(flight.ServerMiddleware):
    """The call's tenant and request id: the client's `x-request-id` when it is a plain token of at most 64
    characters, else one made here. It is logged at the gateway and the connector (docs/operations.md). Made
    for a call counted in `calls`, it counts the call out when the call completes."""

    def __init__(self, tenant_id: str, request_id: str, peer_epoch: int | None = None,
                 calls: TenantCalls | None = None, peer_request: str | None = None) -> None:
        self.tenant_id = tenant_id
        self.request_id = request_id
        self.peer_epoch = peer_epoch  # set: a call forwarded by another replica, for the tunnel of this epoch
        self.peer_request = peer_request  # …and the digest of the one request its credentials allow
        self.leaving_ok = False  # with replicas: this replica's tunnel on its way out may serve the call
        self._calls = calls

    def leaving(self) -> "TenantAuthMiddleware":
        """The same caller, for a replica's tunnel on its way out (draining, moving) when no other replica can
        serve it (poc.gateway.cluster); the copy does not count the call out."""
        copy = TenantAuthMiddleware(self.tenant_id, self.request_id, self.peer_epoch, None, self.peer_request)
        copy.leaving_ok = True
        return copy

    def check_request(self, request: bytes) -> None:
        """For a forwarded call: FlightUnauthenticatedError unless its credentials were made for this request
        (a ticket, a descriptor, an action); nothing for a client's own call."""
        if self.peer_request is not None and not hmac.compare_digest(self.peer_request, request_digest(request)):
            raise flight.FlightUnauthenticatedError("peer credentials are for another request")

    def sending_headers(self):
        return {"x-request-id": self.request_id}

    def call_completed(self, exception):
        calls, self._calls = self._calls, None
        if calls is not None:
            calls.leave(self.tenant_id)


class BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Every call must carry `authorization: Bearer <client_token>`; a `tenant-id` header must agree. With a
    peer secret, a call from another replica may carry `x-poc-peer` instead (PeerCredentials)."""

    def __init__(self, tenants: dict[str, TenantCredentials], peers: PeerCredentials | None = None,
                 gateway_id: str = "", calls: TenantCalls | None = None) -> None:
        self._tokens = TenantTokens(tenants, "client_token")
        self._tenants = set(tenants)
        self._peers = peers
        self._gateway_id = gateway_id
        self.calls = calls or TenantCalls(0)

    def reload(self, tenants: dict[str, TenantCredentials]) -> None:
        """Take new client tokens: calls that start from now on are checked against them."""
        self._tokens = TenantTokens(tenants, "client_token")
        self._tenants = set(tenants)

    def tenant_for(self, token: str) -> str | None:
        """The tenant whose client token this is (HTTP's bearer check: the same tokens as Flight's)."""
        return self._tokens.tenant_for(token)

    def start_call(self, info, headers):
        given = headers.get("x-request-id") or []
        request_id = str(given[0]) if len(given) == 1 and REQUEST_ID.fullmatch(str(given[0])) else \
            "req_" + secrets.token_hex(8)
        peer = headers.get(PEER_HEADER) or []
        if peer:
            if self._peers is None or len(peer) != 1:
                raise flight.FlightUnauthenticatedError("peer calls are not accepted here")
            method = PEER_METHODS.get(info.method)
            if method is None:
                raise flight.FlightUnauthenticatedError("this method is never forwarded between replicas")
            tenant_id, epoch, digest = self._peers.check(str(peer[0]), self._gateway_id, method)
            if tenant_id not in self._tenants:
                raise flight.FlightUnauthenticatedError("peer credentials name a tenant this gateway does not know")
            return self._counted(TenantAuthMiddleware(tenant_id, request_id, epoch, peer_request=digest))
        values = headers.get("authorization") or []
        if len(values) != 1 or not str(values[0]).startswith("Bearer "):
            raise flight.FlightUnauthenticatedError("missing 'authorization: Bearer <token>' header")
        tenant_id = self._tokens.tenant_for(str(values[0])[len("Bearer "):])
        if tenant_id is None:
            raise flight.FlightUnauthenticatedError("invalid client token")
        claimed = headers.get("tenant-id") or []
        if claimed and list(claimed) != [tenant_id]:
            raise flight.FlightUnauthenticatedError("tenant-id header does not match the client token")
        return self._counted(TenantAuthMiddleware(tenant_id, request_id))

    def _counted(self, who: TenantAuthMiddleware) -> TenantAuthMiddleware:
        """The call counted in its tenant's calls in progress (refused over the cap), out when it completes."""
        self.calls.enter(who.tenant_id)
        who._calls = self.calls
        return who


def caller(context: flight.ServerCallContext) -> TenantAuthMiddleware:
    """The authenticated tenant and request id of a call (set by BearerAuthFactory)."""
    middleware = context.get_middleware("auth")
    if middleware is None:
        raise flight.FlightUnauthenticatedError("call is not authenticated")
    return middleware


def caller_tenant(context: flight.ServerCallContext) -> str:
    """The authenticated tenant of a call."""
    return caller(context).tenant_id


class TicketSigner:
    """Tickets name a tenant, a dataset and an expiry and carry an HMAC-SHA256 of all three: unforgeable,
    not transferable, and useless after `ttl_s`."""

    def __init__(self, secret: bytes | None = None, ttl_s: float = TICKET_TTL_S) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, tenant_id: str, dataset: str, epoch: int = 0) -> bytes:
        """A ticket for `dataset`; `epoch` names the tunnel it was issued for (`--registry`: the fencing epoch)."""
        claims = {"t": tenant_id, "d": dataset, "e": round(time.time() + self.ttl_s, 3), "p": epoch}
        body = json.dumps(claims, separators=(",", ":")).encode()
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(body) + b"." + base64.urlsafe_b64encode(mac)

    def redeem(self, ticket: bytes, tenant_id: str) -> str:
        """The dataset a ticket names; raise FlightUnauthorizedError if it is forged or another tenant's."""
        return self.claims(ticket, tenant_id)[0]

    def claims(self, ticket: bytes, tenant_id: str) -> tuple[str, int]:
        """The dataset and tunnel epoch a ticket names; raise FlightUnauthorizedError if it is forged, expired
        or another tenant's."""
        try:
            body_b64, mac_b64 = ticket.split(b".")
            body = base64.urlsafe_b64decode(body_b64)
            mac = base64.urlsafe_b64decode(mac_b64)
        except ValueError:
            raise flight.FlightUnauthorizedError("malformed ticket") from None
        if not hmac.compare_digest(mac, hmac.new(self._secret, body, hashlib.sha256).digest()):
            raise flight.FlightUnauthorizedError("ticket signature is not valid")
        claims = _claims(body, {"t": str, "d": str, "e": (int, float), "p": int})
        # Checked although signed: replicas share the secret, and a leaked one must not carry into a tunnel
        # what no GetFlightInfo would have issued (docs/security.md).
        if claims is None or not valid_dataset_name(claims["d"]):
            raise flight.FlightUnauthorizedError("malformed ticket")
        if claims["t"] != tenant_id:
            raise flight.FlightUnauthorizedError("ticket belongs to another tenant")
        if time.time() > claims["e"]:
            raise flight.FlightUnauthorizedError("ticket expired: ask GetFlightInfo for a new one")
        return claims["d"], claims["p"]


def _claims(body: bytes, fields: dict[str, type | tuple[type, ...]]) -> dict | None:
    """A signed JSON object with exactly `fields`, each of its type (bool is not a number); None otherwise."""
    try:
        claims = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict) or set(claims) != set(fields):
        return None
    for name, kind in fields.items():
        if not isinstance(claims[name], kind) or isinstance(claims[name], bool):
            return None
    return claims


def dataset_from_descriptor(descriptor: flight.FlightDescriptor) -> str:
    """`["dataset", "<name>"]` → name; anything else is a clear error."""
    path = descriptor.path if descriptor.descriptor_type == flight.DescriptorType.PATH else None
    if not path or len(path) != 2 or path[0] != b"dataset" or not path[1]:
        raise pa.ArrowInvalid('descriptor must be the path ["dataset", "<name>"]')
    name = path[1].decode("ascii", "replace")
    if not valid_dataset_name(name):
        raise pa.ArrowInvalid("dataset name must be 1-128 ASCII letters, digits, '_', '-' or '.', "
                              "not starting with '-' or '.'")
    return name


def flight_certificate(cert_file: str, key_file: str) -> flight.CertKeyPair:
    """A PEM certificate chain and key for a grpc+tls:// Flight server."""
    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        return flight.CertKeyPair(cert.read(), key.read())
