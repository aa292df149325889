"""Clients that leave after the first batch, many times a second, while others read whole tables: every
cancel crosses frames on the wire. No tenant may see an error or lose its tunnel, on any transport.
The same workload runs for minutes in `python -m poc soak` (docs/results.md)."""

from __future__ import annotations

import pytest

from poc.workbook.experiments.soak import TRANSPORTS, SoakParams, soak_one


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_abandoned_streams_leave_every_tenant_served(tmp_path, transport, datasets):
    params = SoakParams(seconds=8, clients=8, abandoning=2, rows=200_000, sample_s=2,
                        data_dir=str(datasets["a"].parent.parent / "soak"))
    result = soak_one(params, transport, tmp_path, log=lambda line: None)
    assert result.errors == [], result.errors[:5]
    assert result.abandoned >= 10 and result.full_reads >= 10
    assert result.reconnects == 0 and result.exited == []
    assert result.streams_left == 0 and result.reserved_left == 0
