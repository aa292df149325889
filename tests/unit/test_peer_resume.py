"""The resume ticket one replica sends another (poc.gateway.peer_resume): read by allow-list."""

from __future__ import annotations

import json

import pytest

from poc import errors
from poc.gateway.link import Parked, Replay
from poc.gateway.peer_resume import RESUME_TICKET, read_resume_ticket, resume_ticket
from poc.gateway.sinks import StreamSink


def test_a_parked_streams_ticket_names_its_dataset_next_row_and_fingerprint():
    parked = Parked("tenant_001", Replay("sales", "req_1", "48-17-1000", rows=393216, schema=b"s"), StreamSink(),
                    8 << 20, "closed")
    ticket = read_resume_ticket(resume_ticket(parked).ticket)
    assert (ticket.dataset, ticket.from_row, ticket.fingerprint) == ("sales", 393216, "48-17-1000")
    assert read_resume_ticket(b"eyJ0Ijoi.signed-dataset-ticket") is None  # not one: a dataset ticket's path


@pytest.mark.parametrize("body", [
    {"dataset": "sales", "from_row": True, "fingerprint": "x"},  # a bool is not a row
    {"dataset": "sales", "from_row": 1.5, "fingerprint": "x"},
    {"dataset": "sales", "from_row": -1, "fingerprint": "x"},
    {"dataset": "", "from_row": 0, "fingerprint": "x"},
    {"dataset": "s" * 257, "from_row": 0, "fingerprint": "x"},
    {"dataset": "sales", "from_row": 0, "fingerprint": ""},
    {"dataset": "sales", "from_row": 0, "fingerprint": 7},
    {"dataset": "sales", "from_row": 0},
    {"dataset": "sales", "from_row": 0, "fingerprint": "x", "sql": "SELECT 1"},  # nothing not named
    ["sales", 0, "x"],
])
def test_a_resume_ticket_that_breaks_its_shape_is_refused(body):
    with pytest.raises(errors.InvalidRequest, match="malformed resume ticket"):
        read_resume_ticket(RESUME_TICKET + json.dumps(body).encode())
