"""Per-stream credit: a slow Flight reader slows only its own stream, and gateway memory stays bounded."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, peak_rss, reset_peak_rss, sales

WINDOW = 2 << 20


def test_slow_reader_does_not_stall_another_stream_and_gateway_memory_stays_bounded(tmp_path, tenants, datasets):
    expected = pq.read_table(datasets["large"] / "sales.parquet")  # 1,000,000 rows, ~50 MB as IPC
    args = ("--window-bytes", str(WINDOW), "--max-frame-bytes", str(1 << 20))
    with Cluster(tmp_path, tenants, datasets["large"], gateway_args=args, with_direct=False) as c:
        token = tenants["tenant_001"].client_token
        with flight.connect(c.flight_uri) as slow_client, flight.connect(c.flight_uri) as fast_client:
            ticket = fast_client.get_flight_info(sales(), bearer(token)).endpoints[0].ticket
            assert fast_client.do_get(ticket, bearer(token)).read_all().equals(expected)  # warm-up
            rss_before = reset_peak_rss(c.gateway.pid)

            slow = slow_client.do_get(ticket, bearer(token, timeout=120))
            slow_batches = [slow.read_chunk().data]  # then it stops reading
            fast = fast_client.do_get(ticket, bearer(token)).read_all()
            assert fast.equals(expected)  # completed while the slow stream of the same tenant waits

            time.sleep(1.5)
            peak_growth = peak_rss(c.gateway.pid) - rss_before  # at its worst, since the slow stream began
            in_flight = c.health()["tenants"]["tenant_001"]["streams_in_flight"]

            while True:
                try:
                    slow_batches.append(slow.read_chunk().data)
                except StopIteration:
                    break
    # unbounded buffering would hold the ~48 MB the slow client has not read
    assert peak_growth < 24 * 2**20, f"gateway grew by {peak_growth / 2**20:.1f} MB while one client read slowly"
    assert in_flight == 1  # the slow stream was still open when we measured
    assert pa.Table.from_batches(slow_batches).equals(expected)
