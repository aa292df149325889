"""The tunnel's wire protocol, sans-I/O (docs/protocol.md). Imports no asyncio, sockets or grpc."""

from .connector_endpoint import ConnectorEndpoint
from .endpoint import LinkState
from .gateway_endpoint import GatewayEndpoint
from .limits import Limits
from .errors import CloseCode, FlowControlError, LocalProtocolError, ProtocolError, RemoteProtocolError, TunnelClosed, TunnelError
from .frames import HEADER, DataFrame, FrameType
from .messages import PROTOCOL_VERSION
from .streams import Stream, StreamEvent, StreamState, TRANSITIONS

__all__ = [
    "CloseCode", "ConnectorEndpoint", "GatewayEndpoint", "Limits", "LinkState",
    "FlowControlError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "TunnelClosed", "TunnelError",
    "HEADER", "DataFrame", "FrameType", "PROTOCOL_VERSION",
    "Stream", "StreamEvent", "StreamState", "TRANSITIONS",
]
