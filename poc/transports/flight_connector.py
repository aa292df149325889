"""The connector's side of the Flight tunnel (docs/protocol.md §13; the wire and the gateway's side:
poc.transports.flight_tunnel): pyarrow's Flight client (Arrow C++), its blocking calls run in threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable

from ..tunnel import CloseCode, TunnelClosed
from ..tunnel.endpoint import Endpoint
from .base import Link
from .flight_tunnel import CLOSE, CONTROL, END, TENANT_HEADER, data_command, read_close

log = logging.getLogger("poc.transports")


class DataCallClosed(ConnectionError):
    """A stream's data call ended under the connector: the gateway cancelled the stream or the link is gone."""


class _DataCall:
    """One stream's data call at the connector: its writer, reader, the connection it is on, and whether it is
    ending with END."""

    __slots__ = ("writer", "reader", "ending", "channel")

    def __init__(self, writer, reader, channel: int = 0) -> None:
        self.writer, self.reader, self.ending, self.channel = writer, reader, False, channel


class FlightClientLink(Link):
    """The connector's side: the control call alone on the first of `clients`, so that a control message never
    waits behind batches in a connection's windows or socket (protocol §5a); each stream's data call on one
    of the others (each its own connection: many streams do not share one HTTP/2 connection's window and
    thread). Blocking Flight calls run in threads: the control call's writes in order in one, each data
    call's in the pool."""

    KIND = "flight"
    data_calls = True
    _closed_errors = (TunnelClosed, DataCallClosed)
    STREAMS_PER_CHANNEL = 16  # data calls a connection takes before the next one is used

    def __init__(self, endpoint: Endpoint, clients: list, options, control) -> None:
        self._init_link(endpoint)
        self._loop = asyncio.get_running_loop()
        self._clients = clients[1:]  # for data calls; clients[0] carries the control call
        self._all_clients = clients
        self._options = options
        self._control_call = _DataCall(*control)
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._control_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flight-control")
        self._data_pool = concurrent.futures.ThreadPoolExecutor(512, thread_name_prefix="flight-data")
        self._calls: dict[int, _DataCall] = {}
        self._on_channel = [0] * len(self._clients)  # open data calls per connection
        self.session_id: str | None = None  # set by the session once registered: it names data calls
        self._ending: set[asyncio.Task] = set()
        threading.Thread(target=self._read, name="flight-control-read", daemon=True).start()

    def _read(self) -> None:
        """The control call's messages from the gateway, onto the loop, until the call ends."""
        import pyarrow as pa

        item: object = None
        while isinstance(item, str) or item is None:
            try:
                data, metadata = self._control_call.reader.read_chunk()
            except StopIteration:
                item = TunnelClosed(1006, "control call ended")
            except (pa.ArrowException, OSError) as exc:
                item = TunnelClosed(1006, f"control call failed: {str(exc).splitlines()[0][:200]}")
            else:
                message = metadata.to_pybytes() if metadata is not None else b""
                if data is not None or metadata is None:
                    item = TunnelClosed(CloseCode.PROTOCOL_ERROR, "the gateway sent Flight data on the control call")
                elif message.startswith(CLOSE):
                    item = read_close(message)
                else:
                    item = message.decode("utf-8", "replace")
            try:
                self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
            except RuntimeError:
                return  # the loop is closed: the connector is gone

    async def _receive(self) -> AsyncIterator[str]:
        while True:
            item = await self._inbox.get()
            if isinstance(item, TunnelClosed):
                self.closed = self.closed or item
                return
            yield item

    def _ended(self) -> TunnelClosed:
        return self.closed or TunnelClosed(1006, "control call ended")

    async def _transmit(self, item: str | bytes | bytearray) -> None:
        import pyarrow as pa

        data = pa.py_buffer(item.encode() if isinstance(item, str) else bytes(item))
        try:
            await self._loop.run_in_executor(self._control_pool, self._control_call.writer.write_metadata, data)
        except (pa.ArrowException, OSError) as exc:
            raise TunnelClosed(1006, f"control call failed: {exc}") from None

    # -- data calls
    def _channel(self) -> int:
        """The connection for a new data call: the first with fewer than STREAMS_PER_CHANNEL calls, else the
        least busy. A few streams then share one connection (each more costs the connector CPU: 0.52 core-s/GB
        on one, 0.64 on four at 10 streams), many spread over all (one connection's window and thread bound them:
        tunnel ÷ direct 0.32 on one, 0.36 on four at 100; docs/results.md)."""
        counts = self._on_channel
        return next((i for i, n in enumerate(counts) if n < self.STREAMS_PER_CHANNEL),
                    min(range(len(counts)), key=counts.__getitem__))

    def _open(self, stream_id: int, channel: int) -> _DataCall:
        import pyarrow.flight as flight

        descriptor = flight.FlightDescriptor.for_command(data_command(self.session_id or "", stream_id))
        writer, reader = self._clients[channel].do_exchange(descriptor, options=self._options)
        return _DataCall(writer, reader, channel)

    def _forget(self, stream_id: int) -> _DataCall | None:
        call = self._calls.pop(stream_id, None)
        if call is not None:
            self._on_channel[call.channel] -= 1
        return call

    async def send_data(self, stream_id: int, payload) -> None:
        """One IPC message of a stream, on its data call (opened at its first message). Returns once Flight took
        it: HTTP/2 holds it back while the gateway's side of the stream is full. DataCallClosed when the
        call is gone."""
        import pyarrow as pa

        call = self._calls.get(stream_id)
        try:
            if call is None:
                channel = self._channel()
                self._on_channel[channel] += 1
                try:
                    call = await self._loop.run_in_executor(self._data_pool, self._open, stream_id, channel)
                except BaseException:
                    self._on_channel[channel] -= 1
                    raise
                self._calls[stream_id] = call
            await self._loop.run_in_executor(self._data_pool, call.writer.write_metadata, pa.py_buffer(payload))
        except (pa.ArrowException, OSError) as exc:
            self.drop_data(stream_id)
            raise DataCallClosed(str(exc).splitlines()[0][:200]) from None

    def end_data(self, stream_id: int) -> None:
        """The stream is complete: send END and close its data call, in the background, after its last message."""
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.ending = True
        task = self._loop.create_task(self._end(stream_id, call))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, stream_id: int, call: _DataCall) -> None:
        import pyarrow as pa

        def finish() -> None:
            try:
                call.writer.write_metadata(pa.py_buffer(END))
                call.writer.done_writing()
                try:
                    call.reader.read_chunk()  # the gateway ends the call once it took END
                except StopIteration:
                    pass
            finally:
                call.writer.close()

        try:
            await self._loop.run_in_executor(self._data_pool, finish)
        except (pa.ArrowException, OSError) as exc:
            log.info("data call of stream %d ended with an error: %s", stream_id, str(exc).splitlines()[0][:200])
        finally:
            self._forget(stream_id)

    def drop_data(self, stream_id: int) -> None:
        """The stream failed or was cancelled: cancel its data call, unless it is ending with END."""
        call = self._calls.get(stream_id)
        if call is None or call.ending:
            return
        self._forget(stream_id)
        self._data_pool.submit(_cancel_call, call)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.closed is None:
            self.closed = TunnelClosed(code, reason)
        for stream_id in list(self._calls):
            self.drop_data(stream_id)
        self._control_pool.submit(_cancel_call, self._control_call)
        for client in self._all_clients:  # its connections: every call still on them ends
            self._control_pool.submit(client.close)
        self._control_pool.shutdown(wait=False)
        self._data_pool.shutdown(wait=False)
        self._inbox.put_nowait(self.closed)


def _cancel_call(call: _DataCall) -> None:
    try:
        call.reader.cancel()
        call.writer.close()
    except Exception:  # noqa: BLE001 - the call is gone either way
        pass


async def dial_flight(url: str, endpoint_factory: Callable[[], Endpoint], tenant_id: str, token: str,
                      ca: bytes | None, channels: int, proxy: str | None = None,
                      heartbeat_s: float = 60.0) -> FlightClientLink:
    """Open the control call to flight://HOST:PORT (flight+tls://: TLS, roots from `ca`, else the system's), with
    `channels` connections for data calls; through the HTTP proxy `proxy` (HTTP CONNECT) when given, and never
    through one gRPC would take from the environment otherwise (poc.connector.proxy decided).

    Every connection pings (HTTP/2 keepalive) every `heartbeat_s` (at least 1 s, what the gateway allows) while
    it carries a call: a data call whose stream waits for its client is otherwise silent, and a proxy's idle
    timeout would cut its connection under a live control call (docs/results.md, the corporate network)."""
    import pyarrow.flight as flight

    tls = url.startswith("flight+tls://")
    location = ("grpc+tls://" if tls else "grpc://") + url.split("://", 1)[1].rstrip("/")
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode()),
                                                (TENANT_HEADER.encode(), tenant_id.encode())])

    def connect() -> tuple[list, tuple]:
        kwargs = {"tls_root_certs": ca} if tls and ca else {}
        way_out = [("grpc.http_proxy", proxy)] if proxy else [("grpc.enable_http_proxy", 0)]
        ping_ms = max(1000, int(heartbeat_s * 1000))
        keepalive = [("grpc.keepalive_time_ms", ping_ms), ("grpc.keepalive_timeout_ms", max(ping_ms, 10_000)),
                     ("grpc.http2.max_pings_without_data", 0), ("grpc.http2.min_time_between_pings_ms", ping_ms)]
        clients = [flight.connect(location, generic_options=[("grpc.use_local_subchannel_pool", 1), *way_out,
                                                             *keepalive], **kwargs)
                   for _ in range(1 + max(1, channels))]
        writer, reader = clients[0].do_exchange(flight.FlightDescriptor.for_command(CONTROL), options=options)
        return clients, (writer, reader)

    clients, control = await asyncio.get_running_loop().run_in_executor(None, connect)
    return FlightClientLink(endpoint_factory(), clients, options, control)
