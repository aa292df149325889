"""Errors of the tunnel protocol core.

    TunnelError
    ├── ProtocolError              a rule of docs/protocol.md was broken
    │   ├── LocalProtocolError     we tried to break it (a bug on this side)
    │   └── RemoteProtocolError    the peer broke it; carries the close code to send
    │       └── FlowControlError   the peer sent beyond its credit
    └── TunnelClosed               the link is gone; carries the close code and reason
"""

from __future__ import annotations

from dataclasses import dataclass


class TunnelError(Exception):
    """Base of every error raised by the tunnel."""


class ProtocolError(TunnelError):
    """A rule of the wire contract was broken."""


class LocalProtocolError(ProtocolError):
    """This endpoint was asked to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (docs/protocol.md §8)."""

    def __init__(self, message: str, close_code: int = 4000) -> None:
        super().__init__(message)
        self.close_code = close_code


class FlowControlError(RemoteProtocolError):
    """The peer sent more bytes on a stream than it was granted (§5)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, close_code=4004)


@dataclass
class TunnelClosed(TunnelError):
    """The tunnel closed; code and reason are the WebSocket close frame's."""

    code: int
    reason: str

    def __str__(self) -> str:
        return f"tunnel closed ({self.code}): {self.reason}"


class CloseCode:
    """WebSocket close codes the tunnel uses (docs/protocol.md §8)."""

    NORMAL = 1000
    GOING_AWAY = 1001          # gateway or connector shutting down
    MESSAGE_TOO_BIG = 1009
    PROTOCOL_ERROR = 4000      # malformed or unexpected message
    UNAUTHENTICATED = 4001     # register refused
    REPLACED = 4002            # a newer registration of the same tenant
    HEARTBEAT_TIMEOUT = 4003   # silent for longer than the offline timeout
    FLOW_CONTROL = 4004        # data sent beyond credit
    LIMIT_EXCEEDED = 4005      # request rate or streams in flight over the limit
    TENANT_REMOVED = 4006      # the tenant was removed from the gateway's configuration
    LEASE_LOST = 4007          # --registry: the tunnel's registry entry ran out; register again
    TOO_MANY_LINKS = 4008      # the tenant holds --max-links-per-tenant tunnels here; back off, then retry
    TRY_AGAIN_LATER = 1013     # RFC 6455: the gateway holds --max-pending-tunnels unregistered tunnels
