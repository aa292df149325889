"""The Flight tunnel's data calls at the gateway (docs/protocol.md §13): each stream's IPC messages come on a call
of their own, in that call's gRPC thread. Here they are tied to the stream they claim (the tenant's token in the
headers, a session of that tenant, an open stream of that session with no call yet), checked as every tunnel's
frames are (§4a: the IPC structure, compression only as negotiated and charged by what it decodes to, the frame
limit) and handed to the Flight call that serves the stream, which validates each decoded batch in full. The
event loop is told only when the stream ends or breaks a rule."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc

from ..transports.flight_tunnel import END, read_data_command, read_flight_data
from ..tunnel import RemoteProtocolError, ipc
from .link import StreamItem, TenantLink
from .registry import TenantRegistry


class DataCalls:
    """Serves data calls for the links of `registry` (run from gRPC threads; the registry is read on `loop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: TenantRegistry, timeout_s: float) -> None:
        self.loop = loop
        self.registry = registry
        self.timeout_s = timeout_s

    def _attach(self, tenant_id: str, session_id: str, stream_id: int, context):
        for link in self.registry.tenant_links(tenant_id):
            if link.session_id == session_id and link.closing_reason is None:
                sink = link.attach_data_call(stream_id, context)
                return None if sink is None else (link, sink)
        return None

    def serve(self, tenant_id: str, command: bytes, requests, context: grpc.ServicerContext) -> None:
        """One data call to its end: END, a broken rule, the stream ending at the gateway, or the call breaking."""
        try:
            session_id, stream_id = read_data_command(command)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        future: concurrent.futures.Future = concurrent.futures.Future()

        def attach() -> None:
            try:
                future.set_result(self._attach(tenant_id, session_id, stream_id, context))
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(attach)
        attached = future.result(self.timeout_s)
        if attached is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"no open stream {stream_id} without a data call in session {session_id[:40]!r} "
                          f"of tenant {tenant_id!r}")
        link, sink = attached
        try:
            reason = self._relay(link, stream_id, sink, requests)
        except grpc.RpcError:
            return  # the connector dropped the call, or the stream ended here: its end is decided elsewhere
        if reason is not None:
            self.loop.call_soon_threadsafe(link.data_call_rejected, stream_id, reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason[:300])

    def _relay(self, link: TenantLink, stream_id: int, sink, requests) -> str | None:
        """Check and hand on each message until END (None), a broken rule (its reason), or the stream ending here
        or the call ending without END (None: the connector's `error`, a cancel or the link's end decides)."""
        endpoint = link.endpoint
        codec, max_frame = endpoint.codec, endpoint.limits.max_frame_bytes
        schema = True
        for data in requests:
            try:
                _, payload = read_flight_data(data)
            except RemoteProtocolError as exc:
                return f"a data call message that breaks §13: {exc}"
            if payload == END:
                if schema:
                    return "END before the stream's schema"
                self.loop.call_soon_threadsafe(link.data_call_ended, stream_id)
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
            item = (StreamItem.SCHEMA, payload) if schema else (StreamItem.BATCH, (payload, info.charge))
            if not sink.offer(*item, info.charge):
                return None  # the stream ended here (cancelled, failed, the link gone): the call was cancelled
            schema = False
        return None
