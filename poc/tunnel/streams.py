"""Stream states as a table of transitions, and byte credits (docs/protocol.md §5, §6)."""

from __future__ import annotations

import enum

from .errors import FlowControlError, LocalProtocolError, ProtocolError, RemoteProtocolError


class StreamState(enum.Enum):
    OPEN = "open"            # do_get sent, no schema yet
    STREAMING = "streaming"  # schema sent, batches may follow
    CLOSED = "closed"        # end, error or cancel


class StreamEvent(enum.Enum):
    SCHEMA = "schema"
    BATCH = "batch"
    END = "end"
    CANCEL = "cancel"
    ERROR = "error"


TRANSITIONS: dict[StreamState, dict[StreamEvent, StreamState]] = {
    StreamState.OPEN: {
        StreamEvent.SCHEMA: StreamState.STREAMING,
        StreamEvent.CANCEL: StreamState.CLOSED,
        StreamEvent.ERROR: StreamState.CLOSED,
    },
    StreamState.STREAMING: {
        StreamEvent.BATCH: StreamState.STREAMING,
        StreamEvent.END: StreamState.CLOSED,
        StreamEvent.CANCEL: StreamState.CLOSED,
        StreamEvent.ERROR: StreamState.CLOSED,
    },
    StreamState.CLOSED: {},
}


class Stream:
    """One logical channel: its state and the bytes the sender may still send."""

    __slots__ = ("stream_id", "dataset", "state", "credit", "window")

    def __init__(self, stream_id: int, dataset: str, window: int) -> None:
        self.stream_id = stream_id
        self.dataset = dataset
        self.state = StreamState.OPEN
        self.credit = window
        self.window = window  # credit at the start, plus every growth granted since (the gateway's view)

    def advance(self, event: StreamEvent, error: type[ProtocolError] = LocalProtocolError) -> None:
        """Apply an event; raise `error` if the table has no such move."""
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise error(f"cannot {event.value} stream {self.stream_id} in state {self.state.name}") from None

    def spend(self, size: int, remote: bool) -> None:
        """Take `size` bytes of credit; sending beyond the grant is a violation (§5)."""
        if size > self.credit:
            message = f"stream {self.stream_id}: {size} bytes sent with only {self.credit} bytes of credit"
            raise FlowControlError(message) if remote else LocalProtocolError(message)
        self.credit -= size

    def grant(self, size: int) -> None:
        """Add `size` bytes of credit."""
        if size <= 0:
            raise RemoteProtocolError(f"stream {self.stream_id}: credit grant must be positive, got {size}")
        self.credit += size

    @property
    def closed(self) -> bool:
        return self.state is StreamState.CLOSED
