"""The same tunnel over Arrow Flight itself (docs/protocol.md §13): the connector dials out as a Flight client.

    control call   one DoExchange, descriptor CMD `poc.tunnel.v1.control`: the protocol's control messages (§3),
                   one per FlightData, as its app_metadata (JSON text), both ways
    data call      one DoExchange per stream, from the connector, descriptor CMD `{"session_id", "request_id"}`:
                   the stream's IPC messages (SCHEMA, then BATCHes), one per FlightData, as app_metadata, then the
                   message `end`

Both carry the connector's token in their headers (`authorization: Bearer …`, `tunnel-tenant`), checked before any
message is read. Arrow data never travels as Flight data (data_header, data_body): a Flight reader would decode and
decompress it before anything checked it (docs/results.md), so the gateway serves this port with plain gRPC,
reads each FlightData's few fields itself and refuses every other one. HTTP/2's per-stream flow control is each
stream's credit: no `credit`, `ping` or window sizes on this transport.

The gateway's side, here, is grpc.aio on the gateway's event loop, as every tunnel's control messages are: a data
call's messages are checked there and handed to the Flight call that waits for them (poc.gateway.data_calls); the
connector's is pyarrow's Flight client (poc.transports.flight_connector).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from ..protowire import WireError, read_varint, write_varint
from ..tunnel import CloseCode, RemoteProtocolError, TunnelClosed
from ..tunnel.endpoint import Endpoint
from .base import Link

SERVICE = "arrow.flight.protocol.FlightService"
CONTROL = b"poc.tunnel.v1.control"  # the control call's descriptor command
END = b"end"  # the last message of a data call whose stream is complete
CLOSE = b"close "  # gateway → connector, last message of a control call: `close <code> <reason>`
MAX_COMMAND = 256  # bytes of a data call's descriptor command
TENANT_HEADER = "tunnel-tenant"
CLOSE_WRITE_S = 5.0  # the longest the gateway waits to write `close` before it ends a control call regardless

# FlightData (Flight.proto): flight_descriptor = 1, data_header = 2, app_metadata = 3, data_body = 1000.
# FlightDescriptor: type = 1 (CMD = 2), cmd = 2. Tags: field number << 3 | wire type (2: length-delimited).
_DESCRIPTOR, _HEADER, _METADATA, _BODY = 1, 2, 3, 1000
_TYPE, _CMD, _CMD_TYPE = 1, 2, 2


def _fields(data, allowed: dict[int, int]) -> dict[int, object]:
    """The fields of one protobuf message, each allowed at most once with the wire type `allowed` names;
    RemoteProtocolError for anything else (an unknown field is refused, not skipped)."""
    view = memoryview(data)
    found: dict[int, object] = {}
    pos = 0
    try:
        while pos < len(view):
            key, pos = read_varint(view, pos, max_bytes=3)
            number, wire = key >> 3, key & 7
            if allowed.get(number) != wire or number in found:
                raise RemoteProtocolError(f"field {number} (wire type {wire}) is not allowed here")
            value, pos = read_varint(view, pos, max_bytes=5)
            if wire == 2:
                if pos + value > len(view):
                    raise RemoteProtocolError("a field runs past the end of its message")
                value, pos = view[pos:pos + value], pos + value
            found[number] = value
    except WireError as exc:
        raise RemoteProtocolError(f"malformed protobuf: {exc}") from None
    return found


def read_flight_data(data) -> tuple[bytes | None, memoryview]:
    """(descriptor command or None, app_metadata) of one FlightData. Arrow data in data_header or data_body is
    refused: this tunnel carries IPC messages only as app_metadata, unread until checked."""
    fields = _fields(data, {_DESCRIPTOR: 2, _HEADER: 2, _METADATA: 2, _BODY: 2})
    if len(fields.get(_HEADER, b"")) or len(fields.get(_BODY, b"")):
        raise RemoteProtocolError("Arrow data as Flight data: this tunnel takes IPC messages only as app_metadata")
    command = None
    if _DESCRIPTOR in fields:
        descriptor = _fields(fields[_DESCRIPTOR], {_TYPE: 0, _CMD: 2})
        if descriptor.get(_TYPE) != _CMD_TYPE:
            raise RemoteProtocolError("the descriptor must be a command (CMD)")
        command = bytes(descriptor.get(_CMD, b""))
    return command, fields.get(_METADATA, memoryview(b""))


def metadata_message(payload: bytes) -> bytes:
    """A FlightData carrying `payload` as its app_metadata, nothing else."""
    return bytes([_METADATA << 3 | 2]) + write_varint(len(payload)) + payload


def close_message(code: int, reason: str) -> bytes:
    """The control call's last message from the gateway: the §8 close code and its reason."""
    return CLOSE + f"{int(code)} {reason}".encode("utf-8", "replace")[:240]


def read_close(message: bytes) -> TunnelClosed:
    code, _, reason = message[len(CLOSE):].decode("utf-8", "replace").partition(" ")
    try:
        return TunnelClosed(int(code), reason)
    except ValueError:
        return TunnelClosed(CloseCode.PROTOCOL_ERROR, f"malformed close message {message[:60]!r}")


def data_command(session_id: str, request_id: int) -> bytes:
    """A data call's descriptor command: the session and the stream it carries."""
    return json.dumps({"session_id": session_id, "request_id": request_id}, separators=(",", ":")).encode()


def read_data_command(command: bytes) -> tuple[str, int]:
    """(session id, request id) of a data call's command; ValueError when it is not one."""
    if len(command) > MAX_COMMAND:
        raise ValueError(f"descriptor command over {MAX_COMMAND} bytes")
    try:
        value = json.loads(command)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("descriptor command is not JSON") from None
    if not isinstance(value, dict) or set(value) != {"session_id", "request_id"}:
        raise ValueError('descriptor command must be {"session_id": …, "request_id": …}')
    session, rid = value["session_id"], value["request_id"]
    if not isinstance(session, str) or type(rid) is not int or not 0 < rid < 2 ** 32:
        raise ValueError("descriptor command has a wrong session_id or request_id")
    return session, rid


class FlightServerLink(Link):
    """The gateway's side of one control call, on the gateway's event loop (grpc.aio): each received message is
    read only when the core asks for the next, so HTTP/2 holds a connector back that sends faster; what the
    core sends is written in turn on the call's response stream."""

    KIND = "flight"
    data_calls = True
    _closed_errors = (TunnelClosed, asyncio.InvalidStateError)

    def __init__(self, endpoint: Endpoint, context: grpc.aio.ServicerContext, tenant_id: str) -> None:
        self._init_link(endpoint)
        self._context = context
        self.tenant_id = tenant_id  # named by the call's headers and checked against its token
        self._close_sent = False
        self._closing = asyncio.Event()  # set once `close` is written: the call ends, whatever the connector does
        self._reading: asyncio.Task | None = None  # the task waiting for the next message, while it waits

    async def _receive(self) -> AsyncIterator[str]:
        """Each message as it is read. Once `close` is written the call ends: a read waiting then is cancelled
        (its task is cancelled there, and only there). Each read is awaited directly: a task and a wait per
        message put two more turns of a loop busy with data calls between a reply and its Flight call, which
        cost GetFlightInfo some 50 ms under the seed's load (docs/results.md)."""
        reader = asyncio.current_task()
        while not self._closing.is_set():
            self._reading = reader
            try:
                data = await self._context.read()
            except asyncio.CancelledError:
                if self._closing.is_set() and reader.uncancel() == 0:
                    return  # cancelled by close(), not by the server stopping
                raise
            except (grpc.RpcError, asyncio.InvalidStateError):
                return
            finally:
                self._reading = None
            if data is grpc.aio.EOF:
                return
            yield self._text_of(data)

    @staticmethod
    def _text_of(data: bytes) -> str:
        _, metadata = read_flight_data(data)
        try:
            return str(metadata, "utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("a control message that is not UTF-8") from None

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(1006, "control call ended")

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        if isinstance(item, str) and not self._close_sent:
            await self._context.write(metadata_message(item.encode()))

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        self.closed = self.closed or TunnelClosed(code, reason)
        try:  # a connector that reads nothing more cannot hold this: the call ends after CLOSE_WRITE_S anyway
            async with asyncio.timeout(CLOSE_WRITE_S):
                await self._context.write(metadata_message(close_message(code, reason)))
        except (grpc.RpcError, asyncio.InvalidStateError, RuntimeError, TimeoutError):
            pass  # the call is gone already, or its connector does not read
        finally:
            self._closing.set()
            if self._reading is not None:
                self._reading.cancel()


async def serve_flight_tunnel(host: str, port: int, max_message: int, tls: tuple[bytes, bytes] | None,
                              authorize: Callable[[str, str], bool],
                              on_link: Callable[[FlightServerLink], Awaitable[None]],
                              endpoint_factory: Callable[[], Endpoint],
                              on_data: Callable[[str, bytes, grpc.aio.ServicerContext], Awaitable[None]],
                              refused: Callable[[str], bytes], max_calls: int, window: int,
                              first_message_s: float) -> tuple[grpc.aio.Server, int]:
    """Serve DoExchange on HOST:PORT, on the running event loop: a control call runs `on_link(link)` until the link
    closes; a data call runs `on_data(tenant, command, context)`. A call whose headers do not carry the tenant's
    connector token gets `refused(tenant)` (an `error`) and close 4001, nothing of it read. Each call's HTTP/2
    window is `window` bytes, fixed: gRPC's own sizing (its BDP probe) let 100 streams on loopback hold 1.3 GB
    at the gateway (docs/results.md). Calls open at once are at most `max_calls`, half of them one tenant's; a
    call's first message (its descriptor) must come within `first_message_s`."""
    open_calls: dict[str, int] = {}  # tenant → its calls open on this port (on the loop: no lock)
    tenant_calls = max(1, max_calls // 2)

    async def exchange(requests, context: grpc.aio.ServicerContext) -> None:
        headers = dict(context.invocation_metadata() or ())
        tenant = str(headers.get(TENANT_HEADER, ""))
        bearer = str(headers.get("authorization", ""))
        if not bearer.startswith("Bearer ") or not authorize(tenant, bearer[7:]):
            await context.write(metadata_message(refused(tenant)))
            await context.write(metadata_message(close_message(CloseCode.UNAUTHENTICATED, "invalid token")))
            return
        if open_calls.get(tenant, 0) >= tenant_calls:  # the port's calls are shared: each tenant may hold a share
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"tenant {tenant!r} holds {tenant_calls} calls on this port, its share; retry later")
        open_calls[tenant] = open_calls.get(tenant, 0) + 1
        try:
            await serve_call(tenant, context)
        finally:
            open_calls[tenant] -= 1
            if not open_calls[tenant]:
                del open_calls[tenant]

    async def serve_call(tenant: str, context: grpc.aio.ServicerContext) -> None:
        try:
            async with asyncio.timeout(first_message_s):
                first = await context.read()
            if first is grpc.aio.EOF:
                return
            command, _ = read_flight_data(first)
            if command is None:
                raise RemoteProtocolError("the call's first message carries no descriptor")
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no first message within {first_message_s:g} s")
        except RemoteProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:200])
        if command != CONTROL:
            await on_data(tenant, command, context)
            return
        await on_link(FlightServerLink(endpoint_factory(), context, tenant))

    server = grpc.aio.server(maximum_concurrent_rpcs=max_calls,
                             options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                                      ("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window),
                                      ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
    handler = grpc.stream_stream_rpc_method_handler(exchange)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"DoExchange": handler})])
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])])) if tls
             else server.add_insecure_port(address))
    await server.start()
    return server, bound
