"""A stream cut off with its tunnel, resumed at another replica (`--registry`, docs/protocol.md §6a).

When the tenant's connector comes back only at another replica within the resume window, the replica that holds
the stream's Flight call asks that one for the rest: a forwarded DoGet whose ticket names the dataset, the next
row and the fingerprint the connector gave (accepted from peers only: `read_resume_ticket`). The owner serves it
as a do_get `from_row` on its tunnel — the connector refuses it if the dataset changed — and this replica feeds
the batches into the waiting stream as its client consumes them (`PeerRelay`), the stream's reservation held
until the end. The owner does not count the rows and bytes again: they are counted here, where the client reads
them."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from .. import errors
from ..auth import TenantAuthMiddleware
from .link import Parked
from .sinks import FlowSink, StreamItem

log = logging.getLogger("poc.gateway")

RESUME_TICKET = b"poc-resume/1:"
MAX_NAME = 256  # characters of a dataset name or a fingerprint in a resume ticket


@dataclass(frozen=True)
class ResumeTicket:
    dataset: str
    from_row: int
    fingerprint: str


def resume_ticket(parked: Parked) -> flight.Ticket:
    replay = parked.replay
    return flight.Ticket(RESUME_TICKET + json.dumps(
        {"dataset": replay.dataset, "from_row": replay.rows, "fingerprint": replay.fingerprint},
        separators=(",", ":")).encode())


def read_resume_ticket(raw: bytes) -> ResumeTicket | None:
    """The resume a ticket asks for; None when it is not a resume ticket; InvalidRequest when it is one that
    does not hold exactly the three fields, each of its type and size. The stream's trace id travels as the
    forwarded call's request id."""
    if not raw.startswith(RESUME_TICKET):
        return None
    try:
        body = json.loads(raw[len(RESUME_TICKET):])
    except ValueError:
        body = None
    if not isinstance(body, dict) or set(body) != {"dataset", "from_row", "fingerprint"}:
        raise errors.InvalidRequest("malformed resume ticket")
    dataset, row, fingerprint = body["dataset"], body["from_row"], body["fingerprint"]
    if not (isinstance(dataset, str) and 0 < len(dataset) <= MAX_NAME and isinstance(fingerprint, str)
            and 0 < len(fingerprint) <= MAX_NAME and type(row) is int and row >= 0):
        raise errors.InvalidRequest("malformed resume ticket")
    return ResumeTicket(dataset, row, fingerprint)


class PeerRelay:
    """Feeds a parked stream's sink from the owner's resumed stream, in a thread of its own. It stands in for the
    link in the sink's route: the client's consumption comes back as `grant` (a credit sink) and its leaving as
    `cancel`, both on the loop. It queues at most the stream's reserved window beyond what the client took."""

    def __init__(self, parked: Parked, loop: asyncio.AbstractEventLoop, on_end) -> None:
        self.parked = parked
        self._loop = loop
        self._on_end = on_end  # on the loop, once, however the relay ends
        self._credit = parked.reserved
        self._room = threading.Condition()
        self._cancelled = False
        self._reader: flight.FlightStreamReader | None = None

    # -- the route's side (on the loop)
    def grant(self, stream_id: int, size: int) -> None:
        with self._room:
            self._credit = min(self.parked.reserved, self._credit + size)
            self._room.notify_all()

    def cancel(self, stream_id: int, reason: str) -> None:
        with self._room:
            self._cancelled = True
            reader = self._reader
            self._room.notify_all()
        self.parked.sink.close()  # a flow sink's waiting offer gives up
        if reader is not None:
            reader.cancel()

    # -- the relay (its own thread)
    def start(self, open_at_owner, started: asyncio.Future) -> None:
        """`open_at_owner()` → (reader, schema) of the owner's resumed stream; `started` gets True once the owner
        took it (the sink's route is then this relay), or the refusal's message."""
        threading.Thread(target=self._run, args=(open_at_owner, started), daemon=True,
                         name="poc-peer-resume").start()

    def _run(self, open_at_owner, started: asyncio.Future) -> None:
        try:
            reader, schema = open_at_owner()
            expected = pa.ipc.read_schema(pa.py_buffer(self.parked.replay.schema))
            if not schema.equals(expected, check_metadata=True):
                reader.cancel()
                raise errors.Unavailable("the replica that resumed it answered another schema")
        except Exception as exc:  # refused, unreachable, another schema: the stream goes on waiting
            self._loop.call_soon_threadsafe(_settle, started, str(exc).splitlines()[0][:300] or type(exc).__name__)
            return
        with self._room:
            self._reader = reader
        self._loop.call_soon_threadsafe(self._take_route, started)
        outcome = None
        try:
            for chunk in _chunks(reader):
                payload = chunk.data.serialize()
                if not (self._wait_for_room(payload.size)
                        and self._put(StreamItem.BATCH, (memoryview(payload), payload.size), payload.size)):
                    return  # the client left: nothing more is queued
            outcome = (StreamItem.END, None)
        except Exception as exc:  # the owner's stream failed (or this relay did): the client is told, never short
            outcome = (StreamItem.ERROR, errors.Unavailable(
                f"connector of tenant {self.parked.tenant_id}: the stream resumed at another replica failed: "
                f"{str(exc).splitlines()[0][:300]}"))
        finally:
            if not self._cancelled and outcome is not None:
                self._put(*outcome, 0)
            self.parked.sink.close()
            try:
                self._loop.call_soon_threadsafe(self._on_end)
            except RuntimeError:
                pass  # the loop is closed: the gateway has stopped, and its budget with it

    def _take_route(self, started: asyncio.Future) -> None:
        self.parked.sink.route = (self, 0)
        if self.parked.sink.cancelled:  # the client left while the owner was asked
            self.cancel(0, "the Flight client cancelled the call")
        _settle(started, True)

    def _wait_for_room(self, size: int) -> bool:
        """A credit sink: wait until the client has taken enough (a frame larger than the window waits for all
        of it); a flow sink waits in `offer` instead. False once the client left."""
        if isinstance(self.parked.sink, FlowSink):
            return not self._cancelled
        with self._room:
            while not self._cancelled and self._credit < min(size, self.parked.reserved):
                self._room.wait(1.0)
            self._credit -= size
            return not self._cancelled

    def _put(self, kind: str, value, charge: int) -> bool:
        """Queue one item; False when the stream ended here meanwhile."""
        sink = self.parked.sink
        if isinstance(sink, FlowSink):
            return asyncio.run_coroutine_threadsafe(sink.offer(kind, value, charge), self._loop).result()
        sink.put(kind, value)
        return not self._cancelled


def _chunks(reader: flight.FlightStreamReader):
    while True:
        try:
            yield reader.read_chunk()
        except StopIteration:
            return


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def resumer_caller(parked: Parked) -> TenantAuthMiddleware:
    """Who the forwarded resume is for: the stream's tenant, and its trace id as the call's request id."""
    return TenantAuthMiddleware(parked.tenant_id, (parked.replay.trace_id or "resume")[:64])


class PeerResumer:
    """Asked by poc.gateway.tunnels for each stream waiting to resume: resume it at the replica that holds the
    tenant's tunnel now, through `router` (poc.gateway.cluster.ClusterRouter)."""

    def __init__(self, router, loop: asyncio.AbstractEventLoop) -> None:
        self.router = router
        self._loop = loop

    async def resume(self, parked: Parked, on_end) -> bool | str | None:
        """True once another replica took the stream (its relay then runs to the stream's end, and calls
        `on_end` on the loop); else why it could not (a refusal's message), or None when no other replica holds
        a tunnel of the tenant."""
        directory = self.router.directory
        try:
            entries = await directory.tunnels(parked.tenant_id)
        except Exception:  # the registry cannot say now: asked again later
            return None
        if not any(entry.gateway != directory.gateway_id for entry in entries):
            return None
        who, ticket = resumer_caller(parked), resume_ticket(parked)
        started = self._loop.create_future()
        PeerRelay(parked, self._loop, on_end).start(lambda: self.router.do_get_at_owner(who, ticket), started)
        answer = await started
        if answer is True:
            log.info("stream of %r resumed from row %d at another replica", parked.replay.dataset,
                     parked.replay.rows, extra={"tenant": parked.tenant_id, "request_id": parked.replay.trace_id})
        else:
            log.info("stream of %r could not resume at another replica yet: %s", parked.replay.dataset, answer,
                     extra={"tenant": parked.tenant_id, "request_id": parked.replay.trace_id})
        return answer
