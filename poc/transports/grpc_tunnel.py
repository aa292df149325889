"""The same tunnel over one long-lived bidirectional gRPC stream (HTTP/2), dialled out by the connector.

Service (docs/protocol.md §12):

    package poc.tunnel.v1;
    message Envelope { oneof kind { string text = 1; bytes binary = 2; } }
    service Tunnel { rpc Connect(stream Envelope) returns (stream Envelope); }

Each Envelope carries one WebSocket message of the same protocol: `text` a control message, `binary` a data
frame. The close code and reason travel in the trailing metadata `tunnel-close-code`/`tunnel-close-reason`.
Envelopes are encoded here by hand (two protobuf fields), so no generated code is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio

from ..protowire import WireError, read_varint, write_varint
from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Endpoint
from .base import Link

SERVICE = "poc.tunnel.v1.Tunnel"
METHOD = f"/{SERVICE}/Connect"
_TEXT, _BINARY = 0x0A, 0x12  # protobuf tags: field 1 and field 2, length-delimited


def encode(item: str | bytes | bytearray) -> bytes:
    """One Envelope: a text (control) or binary (data) message."""
    tag, data = (_TEXT, item.encode()) if isinstance(item, str) else (_BINARY, item)
    return bytes([tag]) + write_varint(len(data)) + data


def decode(data: bytes) -> str | memoryview:
    """The message in an Envelope; a binary payload is a view, not a copy."""
    view = memoryview(data)
    if len(view) < 2 or view[0] not in (_TEXT, _BINARY):
        raise RemoteProtocolError("envelope is not a text or binary message")
    try:
        size, pos = read_varint(view, 1, max_bytes=5)
    except WireError:
        raise RemoteProtocolError("envelope length is malformed") from None
    if pos + size != len(view):
        raise RemoteProtocolError("envelope length does not match its size")
    payload = view[pos:]
    if data[0] == _TEXT:
        try:
            return str(payload, "utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("text envelope is not UTF-8") from None
    return payload


def ascii_reason(reason: str) -> str:
    """A close reason fit for gRPC metadata, which takes printable ASCII only (§12): a reason may quote what
    the peer sent, so anything else is replaced, never passed through to break the call's trailers."""
    return "".join(c if " " <= c <= "~" else "?" for c in reason[:120])


def _own_cancellation() -> bool:
    """True when the running task itself is being cancelled (then CancelledError must propagate), False when
    grpc raised it because the call was cancelled under us."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class GrpcServerLink(Link):
    """The gateway's side of one Connect call."""

    KIND = "grpc"

    _closed_errors = (grpc.aio.AioRpcError, grpc.aio.UsageError, TunnelClosed)

    def __init__(self, endpoint: Endpoint, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        self._init_link(endpoint)
        self._requests = requests
        self._context = context
        self.finished = asyncio.Event()

    async def _receive(self) -> AsyncIterator[str | memoryview]:
        try:
            async for data in self._requests:
                yield decode(data)
        except grpc.aio.AioRpcError as exc:
            self.closed = self.closed or TunnelClosed(1006, f"stream broken: {exc.code().name}")
        except asyncio.CancelledError:
            if _own_cancellation():
                raise
            self.closed = self.closed or TunnelClosed(1006, "stream cancelled")

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(CloseCode.GOING_AWAY, "connector ended the stream")

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        await self._context.write(encode(item))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.closed is None:
            self.closed = TunnelClosed(code, reason)
        if not self.finished.is_set():
            self._context.set_trailing_metadata((("tunnel-close-code", str(code)),
                                                 ("tunnel-close-reason", ascii_reason(reason))))
        self.finished.set()


class GrpcClientLink(Link):
    """The connector's side: one Connect call on its own channel."""

    KIND = "grpc"

    _closed_errors = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TunnelClosed)

    def __init__(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        self._init_link(endpoint)
        self._channel = channel
        self._call = channel.stream_stream(METHOD)()

    async def _receive(self) -> AsyncIterator[str | memoryview]:
        try:
            while (data := await self._call.read()) is not grpc.aio.EOF:
                yield decode(data)
            metadata = dict(await self._call.trailing_metadata() or ())
            try:
                code = int(metadata.get("tunnel-close-code", 1000))
            except ValueError:
                code = 1000
            self.closed = self.closed or TunnelClosed(code, metadata.get("tunnel-close-reason", "closed"))
        except grpc.aio.AioRpcError as exc:
            self.closed = self.closed or TunnelClosed(1006, f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:  # grpc raises it when the call was cancelled: a lost link, not an exit
            if _own_cancellation():
                raise
            self.closed = self.closed or TunnelClosed(1006, "call cancelled")

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(1006, "stream ended")

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        await self._call.write(encode(item))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.closed is None:
            self.closed = TunnelClosed(code, reason)
        self._call.cancel()
        await self._channel.close()


def channel_options(max_receive: int, keepalive_s: float | None = None) -> list[tuple[str, int]]:
    """No gRPC default may cut a large batch: sending is unlimited (the receiver enforces its own limit,
    announced in `registered`), receiving is sized for the largest message this end accepts."""
    options = [("grpc.max_receive_message_length", max_receive), ("grpc.max_send_message_length", -1)]
    if keepalive_s:
        options += [("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                    ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000)),
                    ("grpc.keepalive_permit_without_calls", 1)]
    return options


async def serve_grpc(on_link: Callable[[GrpcServerLink], object], endpoint_factory: Callable[[], Endpoint],
                     host: str, port: int, max_message: int, tls: tuple[bytes, bytes] | None = None
                     ) -> tuple[grpc.aio.Server, int]:
    """Serve Connect; each call runs `on_link(link)` until the link closes."""
    async def connect(requests, context):
        link = GrpcServerLink(endpoint_factory(), requests, context)
        task = asyncio.get_running_loop().create_task(on_link(link))
        task.add_done_callback(lambda _: link.finished.set())
        await link.finished.wait()

    server = grpc.aio.server(options=channel_options(max_message + 64) +
                             [("grpc.http2.min_ping_interval_without_data_ms", 1000),
                              ("grpc.keepalive_permit_without_calls", 1)])
    handler = grpc.stream_stream_rpc_method_handler(connect)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler})])
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])])) if tls
             else server.add_insecure_port(address))
    await server.start()
    return server, bound


async def dial_grpc(target: str, endpoint_factory: Callable[[], Endpoint], ca: bytes | None, tls: bool,
                    heartbeat_s: float, max_message: int) -> GrpcClientLink:
    """Open the Connect stream to HOST:PORT; TLS when `tls` (roots from `ca`, else the system's)."""
    options = channel_options(max_message + 64, heartbeat_s)
    channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca), options=options) if tls
               else grpc.aio.insecure_channel(target, options=options))
    # No wait for the channel to be ready: the call itself fails at once with gRPC's reason (connection
    # refused, TLS handshake failed: CERTIFICATE_VERIFY_FAILED, ...), which the connector logs.
    return GrpcClientLink(endpoint_factory(), channel)
