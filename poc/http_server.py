"""The HTTP/1.1 server of the gateway's and the direct server's HTTP ports: h11 does the framing, this module
the bounds, and a handler maps each request to a response.

h11 (python-hyper) parses and writes HTTP/1.1 and has been attacked for years: a body is never read as a
request, headers are bounded, malformed input is an error with a status. Around it, on an event loop of its
own thread (the tunnel's loop never waits for HTTP):

- at most `max_connections` connections at once; past it a connection gets 503 and is closed;
- a whole-request deadline: from the connection's start, or the end of the previous response, a request's
  headers and body must arrive within `request_deadline_s` (a client dribbling bytes is cut, 408);
- a body of at most `max_body_bytes` (413 from its Content-Length, before it is read), headers of at most
  `MAX_HEADER_BYTES` (431);
- malformed requests get 400 and the connection is closed; no banner names the server or its version;
- the handler runs in a thread of its own per request (it may wait on the tunnel), and a streamed response
  is written one chunk at a time, each only once the socket took the last: a slow client slows only its own
  stream. A chunk that waits longer than `write_timeout_s` ends the stream; a stream that fails after its
  first byte is cut without its final chunk, so the client sees an error, never a short body; what it wrote
  before failing is sent first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

from .config import HTTP_MAX_BODY_BYTES as MAX_BODY_BYTES
from .config import HTTP_MAX_CONNECTIONS as MAX_CONNECTIONS
from .config import HTTP_REQUEST_DEADLINE_S as REQUEST_DEADLINE_S

log = logging.getLogger("poc.http")

MAX_HEADER_BYTES = 16 * 1024
WRITE_TIMEOUT_S = 120.0
READ_BYTES = 64 * 1024


@dataclass
class Request:
    method: str
    path: str  # the target up to '?', not decoded
    headers: dict[str, str]  # lower-case names; a repeated header's values joined by ", "
    body: bytes = b""
    peer: str = ""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


@dataclass
class Response:
    """A whole body, or `stream`: an iterator of buffers written as chunks (closed however it ends)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Iterator | None = None


Handler = Callable[[Request], Response]


class _Refused(Exception):
    """A request refused before the handler sees it: its status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HttpServer:
    """Serves `handler` on (host, port) from its own thread; `start()` binds (port 0 picks one), `shutdown()`
    stops it."""

    def __init__(self, address: tuple[str, int], handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 request_deadline_s: float = REQUEST_DEADLINE_S, max_body_bytes: int = MAX_BODY_BYTES,
                 write_timeout_s: float = WRITE_TIMEOUT_S, name: str = "http") -> None:
        self._address = address
        self.handler = handler
        self.max_connections = max_connections
        self.request_deadline_s = request_deadline_s
        self.max_body_bytes = max_body_bytes
        self.write_timeout_s = write_timeout_s
        self.connections = 0
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        # One thread per request at most: a handler waiting on a tunnel never makes another request wait.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_connections, thread_name_prefix=f"{name}-request")
        self.server_address: tuple[str, int] = address

    def start(self) -> None:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._serve, *self._address, limit=READ_BYTES, reuse_address=True))
                self.server_address = self._server.sockets[0].getsockname()[:2]
            except BaseException as exc:
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    def shutdown(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop)
        self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                writer.write(_plain(503, f"the server holds {self.max_connections} connections, the most it "
                                         "takes; retry later"))
                async with asyncio.timeout(self.request_deadline_s):
                    await writer.drain()
                return
            await self._requests(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # a bug here: this connection ends, the server goes on
            log.exception("HTTP connection failed")
        finally:
            self.connections -= 1
            self._tasks.discard(task)
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        peer = writer.get_extra_info("peername")
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        while True:
            try:
                async with asyncio.timeout(self.request_deadline_s):
                    request = await self._read_request(conn, reader, writer)
            except TimeoutError:
                await self._send_error(conn, writer, 408, f"the request did not arrive within "
                                                          f"{self.request_deadline_s:g} s")
                return
            except _Refused as exc:
                await self._send_error(conn, writer, exc.status, str(exc))
                return
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, writer, exc.error_status_hint, f"malformed request: {exc}")
                return
            if request is None:  # the client closed the connection between requests
                return
            request.peer = peer
            try:
                response = await asyncio.get_running_loop().run_in_executor(self._pool, self.handler, request)
            except Exception:
                log.exception("HTTP %s %s failed", request.method, request.path[:200])
                response = Response(500, {"Content-Type": "application/json"}, b'{"error": "internal error"}')
            if not await self._send(conn, writer, request, response):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Request | None:
        request: Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                data = await reader.read(READ_BYTES)
                conn.receive_data(data)
                if not data and request is None and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                if sum(len(name) + len(value) + 4 for name, value in event.headers) > MAX_HEADER_BYTES:
                    raise _Refused(431, f"request headers over the limit of {MAX_HEADER_BYTES} bytes")
                headers: dict[str, str] = {}
                for name, value in event.headers:
                    key = name.decode("ascii").lower()
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                length = headers.get("content-length")
                if length is not None and int(length.split(",")[0]) > self.max_body_bytes:
                    raise _Refused(413, f"request body of {length} bytes, over the limit of {self.max_body_bytes}")
                target = event.target.decode("ascii", "replace")
                request = Request(event.method.decode("ascii", "replace"), target.split("?", 1)[0], headers)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_bytes:
                    raise _Refused(413, f"request body over the limit of {self.max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                request.body = bytes(body)
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # h11.PAUSED cannot come while a request is read
                raise h11.RemoteProtocolError("unexpected input", error_status_hint=400)

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                          message: str) -> None:
        """A JSON error and the end of the connection; nothing when a response was already begun."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = _json_error(message)
        try:
            writer.write(conn.send(h11.Response(status_code=status, reason=_reason(status), headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")])))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except (h11.LocalProtocolError, TimeoutError, ConnectionError):
            pass

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request,
                    response: Response) -> bool:
        """Write a response; False when the connection must end (a stream cut, the client gone)."""
        headers = list(response.headers.items())
        if response.stream is None:
            headers.append(("Content-Length", str(len(response.body))))
        try:
            writer.write(conn.send(h11.Response(status_code=response.status, headers=headers,
                                                reason=_reason(response.status))))
            if response.stream is None:
                if response.body and request.method != "HEAD":
                    writer.write(conn.send(h11.Data(data=response.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                async with asyncio.timeout(self.write_timeout_s):
                    await writer.drain()
                return True
        except (TimeoutError, ConnectionError, h11.LocalProtocolError):
            if response.stream is not None:
                await asyncio.get_running_loop().run_in_executor(self._pool, getattr(response.stream, "close",
                                                                                     lambda: None))
            return False
        return await self._stream(conn, writer, response.stream)

    async def _stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, chunks: Iterator) -> bool:
        """Each chunk of `chunks`, read in a worker thread once the socket took the last one."""
        loop = asyncio.get_running_loop()
        done = object()
        try:
            while (chunk := await loop.run_in_executor(self._pool, next, chunks, done)) is not done:
                for piece in conn.send_with_data_passthrough(h11.Data(data=memoryview(chunk))):  # not copied
                    writer.write(piece)
                async with asyncio.timeout(self.write_timeout_s):
                    await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
            return True
        except Exception as exc:
            log.info("HTTP stream ended early: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            if not isinstance(exc, (ConnectionError, TimeoutError)):  # the source failed, not the client:
                try:  # what was written (the stream's own last words, poc.http_arrow's error chunk) reaches it
                    writer.transport.set_write_buffer_limits(0)
                    async with asyncio.timeout(self.write_timeout_s):
                        await writer.drain()
                except (ConnectionError, TimeoutError):
                    pass
            writer.transport.abort()  # no final chunk: the client's read fails
            return False
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await loop.run_in_executor(self._pool, close)  # the tunnel stream is cancelled if unfinished


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _plain(status: int, message: str) -> bytes:
    """A whole response written without h11 (to a connection refused before it is served)."""
    body = _json_error(message)
    return (f"HTTP/1.1 {status} {_reason(status).decode()}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body
