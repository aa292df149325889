"""The Flight tunnel's data calls at the gateway (docs/protocol.md §13): each stream's IPC messages come on a call
of their own, read on the gateway's event loop (grpc.aio). Here they are tied to the stream they claim (the
tenant's token in the headers, a session of that tenant, an open stream of that session with no call yet),
checked as every tunnel's frames are (§4a: the IPC structure, compression only as negotiated and charged by what it
decodes to, the frame limit) and handed to the Flight call that serves the stream, which validates each decoded
batch in full. A call reads its next message only once the stream's sink has room: HTTP/2 holds the connector back."""

from __future__ import annotations

import asyncio

import grpc

from ..transports.flight_tunnel import END, read_data_command, read_flight_data
from ..tunnel import RemoteProtocolError, ipc
from .link import TenantLink
from .sinks import FlowSink, StreamItem
from .registry import TenantRegistry


CUT = "cut"  # a data call that ended without END
CUT_GRACE_S = 0.2


class _Call:
    """A data call as its stream sees it: `cancel()` ends it when the stream ends first (the client left, the
    stream failed, the link closed), also while it waits for the connector's next message."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


class DataCalls:
    """Serves data calls for the links of `registry`, on the event loop."""

    def __init__(self, registry: TenantRegistry, parker=lambda: None) -> None:
        self.registry = registry
        self._parker = parker  # what takes a stream whose data call was cut (poc.gateway.tunnels), or None

    def _attach(self, tenant_id: str, session_id: str, stream_id: int, call: _Call):
        for link in self.registry.tenant_links(tenant_id):
            if link.session_id == session_id and link.closing_reason is None:
                sink = link.attach_data_call(stream_id, call)
                return None if sink is None else (link, sink)
        return None

    async def serve(self, tenant_id: str, command: bytes, context: grpc.aio.ServicerContext) -> None:
        """One data call to its end: END, a broken rule, the stream ending at the gateway (its relay is cancelled),
        or the call breaking."""
        call = _Call()
        try:
            session_id, stream_id = read_data_command(command)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        attached = self._attach(tenant_id, session_id, stream_id, call)
        if attached is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no open stream {stream_id} without a data call in session {session_id[:40]!r} "
                                f"of tenant {tenant_id!r}")
        link, sink = attached
        call.task = asyncio.get_running_loop().create_task(self._relay(link, stream_id, sink, context))
        try:
            reason = await call.task
        except asyncio.CancelledError:
            if not call.cancelled:  # this call's own handler was cancelled: its connection was lost (or the
                self._cut(link, stream_id, "its connection was lost")  # server is stopping, with every link)
                raise
            await context.abort(grpc.StatusCode.CANCELLED, "the stream ended at the gateway")
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # the connector dropped the call, or its connection was cut: if the stream is still open, the latter
            self._cut(link, stream_id, str(exc).splitlines()[0][:200] or type(exc).__name__)
            return
        if reason is CUT:
            self._cut(link, stream_id, "it ended without END")
        elif reason is not None:
            link.data_call_rejected(stream_id, reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason[:300])

    def _cut(self, link: TenantLink, stream_id: int, why: str) -> None:
        """A data call ended without END: a moment later, unless the connector's `error` (sent on the control
        call before it dropped the data call) ended the stream meanwhile, the call was cut (TenantLink.data_call_cut)."""
        asyncio.get_running_loop().call_later(CUT_GRACE_S, lambda: link.data_call_cut(stream_id, why, self._parker()))

    async def _relay(self, link: TenantLink, stream_id: int, sink: FlowSink, context) -> str | None:
        """Check and hand on each message until END (None), a broken rule (its reason), the stream ending here
        (None), or the call ending without END (CUT: the stream's end is decided by the connector's `error`, a
        cancel or the link's end if one came, else the call was cut)."""
        endpoint = link.endpoint
        codec, max_frame = endpoint.codec, endpoint.limits.max_frame_bytes
        schema = True
        while (data := await context.read()) is not grpc.aio.EOF:
            try:
                _, payload = read_flight_data(data)
            except RemoteProtocolError as exc:
                return f"a data call message that breaks §13: {exc}"
            if payload == END:
                if schema:
                    return "END before the stream's schema"
                link.data_call_ended(stream_id)
                return None
            if len(payload) > max_frame:
                return f"an IPC message of {len(payload)} bytes, over max_frame_bytes {max_frame}"
            kind = "SCHEMA" if schema else "BATCH"
            try:
                info = ipc.check_message(payload, ipc.SCHEMA if schema else ipc.RECORD_BATCH, codec)
            except ipc.InvalidMessage as exc:
                return f"invalid Arrow IPC in a {kind} message: {exc}"
            if info.charge > max_frame:
                return f"a BATCH message that decodes to {info.charge} bytes, over max_frame_bytes"
            if schema and not link.take_schema(stream_id, payload):  # a resumed stream's repeat (§6a)
                schema = False
                continue
            item = (StreamItem.SCHEMA, payload) if schema else (StreamItem.BATCH, (payload, info.charge))
            if not await sink.offer(*item, info.charge):
                return None  # the stream ended here (cancelled, failed, the link gone)
            if not schema:
                link.count_rows(stream_id, info.length)  # queued for the client: a resume starts after it
            schema = False
        return CUT
