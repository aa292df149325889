"""How an HTTP Arrow stream that fails midway ends (poc.http_arrow.IpcChunks): the client's reason as the last line,
then the failure (cut) or, asked for, a clean end; an internal error's text never reaches the client."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from poc.http_arrow import ERROR_CHUNK, IpcChunks

SCHEMA = pa.schema([("id", pa.int64())])


class Who:
    def __init__(self) -> None:
        self.completed = []

    def call_completed(self, error) -> None:
        self.completed.append(error)


def failing(error: Exception):
    yield pa.record_batch([pa.array([1, 2, 3])], schema=SCHEMA)
    raise error


@pytest.mark.parametrize("error, status, said", [
    (flight.FlightUnavailableError("connector of tenant t1 disconnected. Detail: Unavailable"), 503,
     "connector of tenant t1 disconnected"),
    (RuntimeError("a bug in /srv/secret/path.py"), 500, "internal error"),
])
def test_a_failed_stream_ends_with_the_clients_reason(error, status, said):
    who = Who()
    chunks = IpcChunks(SCHEMA, failing(error), who)
    assert next(chunks)  # the schema
    assert next(chunks)  # the batch
    last = next(chunks)
    assert last.startswith(ERROR_CHUNK) and last.endswith(b"\n")
    assert json.loads(last[len(ERROR_CHUNK):]) == {"status": status, "error": said}
    with pytest.raises(type(error)):
        next(chunks)  # then the failure: the server cuts the response
    chunks.close()
    assert who.completed == [None]


def test_asked_for_it_the_stream_ends_cleanly_after_the_reason():
    chunks = IpcChunks(SCHEMA, failing(flight.FlightUnavailableError("gone")), Who(), errors_in_body=True)
    parts = list(chunks)
    assert parts[-1].startswith(ERROR_CHUNK) and len(parts) == 3
    with pytest.raises(pa.ArrowInvalid):
        pa.ipc.open_stream(b"".join(bytes(p) for p in parts)).read_all()  # never a table that looks whole
