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

The gateway's side, here, is synchronous gRPC (a thread per call: a data call's messages are checked in its own
thread and handed to the Flight call that waits for them, without the event loop); the connector's is pyarrow's
Flight client (poc.transports.flight_connector).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable

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
_ENDED = object()

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
    """The gateway's side of one control call. A thread reads the call's messages into the loop (at most
    INBOX of them waiting: past that the thread stops reading and HTTP/2 holds the connector back); what the
    core sends is queued for the call's response stream."""

    KIND = "flight"
    data_calls = True
    INBOX = 64
    _closed_errors = (TunnelClosed,)

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop, tenant_id: str) -> None:
        self._init_link(endpoint)
        self._loop = loop
        self.tenant_id = tenant_id  # named by the call's headers and checked against its token
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(self.INBOX)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._close_sent = False

    # -- the call's threads
    def read(self, requests) -> None:
        """The control call's messages, each put on the loop as text (or the error that ends the link)."""
        try:
            for data in requests:
                try:
                    _, metadata = read_flight_data(data)
                    item: object = str(metadata, "utf-8")
                except UnicodeDecodeError:
                    item = RemoteProtocolError("a control message that is not UTF-8")
                except RemoteProtocolError as exc:
                    item = exc
                self._room.acquire()
                self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
                if not isinstance(item, str):
                    return
        except grpc.RpcError:
            pass
        finally:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, _ENDED)

    def responses(self):
        """The call's response stream: what the core sends, until the link is closed or the call ends."""
        while (item := self._outbox.get()) is not _ENDED:
            yield item

    def finish(self) -> None:
        """The call ends (its handler's link is done, or gRPC ended the call)."""
        self._outbox.put(_ENDED)

    # -- Link
    async def _receive(self) -> AsyncIterator[str]:
        while True:
            item = await self._inbox.get()
            self._room.release()
            if item is _ENDED:
                self.closed = self.closed or TunnelClosed(1006, "control call ended")
                return
            if isinstance(item, RemoteProtocolError):
                raise item
            yield item

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(1006, "control call ended")

    def _can_send_now(self) -> bool:
        return self.closed is None

    def _send_now(self, text: str) -> None:
        self._outbox.put(metadata_message(text.encode()))

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        if isinstance(item, str):
            self._send_now(item)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        self.closed = self.closed or TunnelClosed(code, reason)
        self._outbox.put(metadata_message(close_message(code, reason)))
        self.finish()


def serve_flight_tunnel(loop: asyncio.AbstractEventLoop, host: str, port: int, max_message: int,
                        tls: tuple[bytes, bytes] | None, authorize: Callable[[str, str], bool],
                        on_link: Callable[[FlightServerLink], object], endpoint_factory: Callable[[], Endpoint],
                        on_data: Callable[[str, bytes, object, grpc.ServicerContext], None],
                        refused: Callable[[str], bytes], max_calls: int, window: int) -> tuple[grpc.Server, int]:
    """Serve DoExchange on HOST:PORT: a control call runs `on_link(link)` on the loop until the link closes; a
    data call runs `on_data(tenant, command, requests, context)` in its own thread. A call whose headers do not
    carry the tenant's connector token gets `refused(tenant)` (an `error`) and close 4001, nothing of it read.
    Each call's HTTP/2 window is `window` bytes, fixed: gRPC's own sizing (its BDP probe) let 100 streams on
    loopback hold 1.3 GB at the gateway (docs/results.md)."""

    def exchange(requests, context: grpc.ServicerContext):
        headers = dict(context.invocation_metadata())
        tenant = str(headers.get(TENANT_HEADER, ""))
        bearer = str(headers.get("authorization", ""))
        if not bearer.startswith("Bearer ") or not authorize(tenant, bearer[7:]):
            return iter([metadata_message(refused(tenant)),
                         metadata_message(close_message(CloseCode.UNAUTHENTICATED, "invalid token"))])
        try:
            command, _ = read_flight_data(next(requests))
            if command is None:
                raise RemoteProtocolError("the call's first message carries no descriptor")
        except (StopIteration, grpc.RpcError):
            return iter(())
        except RemoteProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:200])
        if command != CONTROL:
            on_data(tenant, command, requests, context)
            return iter(())
        link = FlightServerLink(endpoint_factory(), loop, tenant)
        context.add_callback(link.finish)
        threading.Thread(target=link.read, args=(requests,), name="flight-tunnel-read", daemon=True).start()
        done = asyncio.run_coroutine_threadsafe(on_link(link), loop)
        done.add_done_callback(lambda _: link.finish())
        return link.responses()

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_calls, thread_name_prefix="flight-tunnel"),
                         maximum_concurrent_rpcs=max_calls,
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
    server.start()
    return server, bound
