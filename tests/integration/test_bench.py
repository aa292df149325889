"""`python -m poc bench`: every process's core-seconds per GB, per path, and the two-hop limit computed from them."""

from __future__ import annotations

import pytest

from poc.workbook.experiments.bench import BenchParams, account, run_bench, table


def test_account_puts_each_hop_against_its_ideal_and_computes_the_two_hop_limit():
    """The figures of a measured run (core-s/GB): a connector at 1.84 × the direct server, a gateway at 1.22 ×
    server + client; an ideal relay would cost 0.225 + 0.515 + 0.335, so 0.48 × direct is the limit."""
    run = {"direct_server_cpu_s_per_gb": 0.225, "direct_client_cpu_s_per_gb": 0.29,
           "ws_connector_cpu_s_per_gb": 0.415, "ws_gateway_cpu_s_per_gb": 0.63, "ws_client_cpu_s_per_gb": 0.335}
    figures = account(run, "ws_")
    assert figures["ws_connector_cpu_ratio"] == pytest.approx(0.415 / 0.225)
    assert figures["ws_gateway_cpu_ratio"] == pytest.approx(0.63 / 0.515)
    assert figures["ws_tunnel_cpu_s_per_gb"] == pytest.approx(1.38)
    assert figures["ws_cpu_ratio"] == pytest.approx(0.515 / 1.38)
    assert figures["ws_two_hop_limit"] == pytest.approx(0.515 / 1.075)
    assert "ws_gateway_relay_ratio" not in figures  # no plain relay measured: nothing to put the gateway against
    run["reference_relay_cpu_s_per_gb"] = 0.9  # a plain Flight relay beside it
    figures = account(run, "ws_")
    assert figures["ws_gateway_relay_ratio"] == pytest.approx(0.63 / 0.9)
    assert figures["ws_relay_limit"] == pytest.approx(0.515 / (0.225 + 0.9 + 0.335))


def test_the_bench_says_where_every_core_second_goes(tmp_path):
    params = BenchParams(rows=1_000_000, concurrency=(2,), requests_per_level=4, single_runs=1, info_calls=2,
                         repetitions=1, data_dir=str(tmp_path / "data"))
    result = run_bench(params, log=lambda line: None)
    run = result["runs"][0]
    for key in ("direct_server", "direct_client", "connector", "gateway", "client", "reference_server",
                "reference_relay", "reference_client"):
        assert run[f"{key}_cpu_s_per_gb_c2"] > 0, key  # each process served or read the bytes: it spent CPU
    # four DoGets of ~50 MB each way: the CPU is divided by what was delivered, not by a guess
    assert 0.05 < run["direct_server_cpu_s_per_gb"] < 20 and 0.05 < run["connector_cpu_s_per_gb"] < 20
    assert run["two_hop_limit"] == pytest.approx(account(run)["two_hop_limit"])
    assert result["figures"]["gateway_cpu_ratio"]["median"] == run["gateway_cpu_ratio"]
    text = table(result)
    assert "where the core-seconds go" in text
    assert f"two-hop limit of tunnel ÷ direct {run['two_hop_limit']:.2f}" in text
    assert "connector CPU per GB ÷ direct server's" in text and "≤1.1" in text
    # the plain Flight relay read the same table through two hops: its ratio and cost, the gateway against it
    assert 0 < run["reference_ratio_c2"] < 5
    assert f"plain Flight relay {run['reference_relay_cpu_s_per_gb']:.3f}" in text
    assert run["gateway_relay_ratio"] == pytest.approx(account(run)["gateway_relay_ratio"])
    assert f"gateway {run['gateway_relay_ratio']:.2f} × the plain Flight relay" in text
    assert "compressed_switches" in run  # read from the connector's log: a run that compressed says so
    run["compressed_switches"] = 0
    assert "WARNING" not in table(result)
    run["compressed_switches"] = 2
    assert "WARNING: the websocket connector turned compression on 2 time(s)" in table(result)
    # memory another measurement left at the shared gateway makes a peak an upper bound, and the table says so
    run["compressed_switches"] = 0
    assert run["gateway_held_mb_c2"] < 50  # the first tunnel's first level starts from the idle gateway
    run["gateway_held_mb_c2"] = 300.0
    assert ("WARNING: the gateway began websocket's 2 concurrent streams holding up to 300 MB more than when idle"
            in table(result))


@pytest.mark.parametrize("share, said", [
    (8 << 20, "a DoGet failed: tenant tenant_001 is at its share of the gateway's buffer"),  # one stream's window
    (1 << 20, "a server did not start: error: --max-tenant-buffered-bytes must be 0 or at least"),
], ids=["refused_doget", "refused_setting"])
def test_a_setting_the_run_cannot_use_stops_the_bench_with_the_reason(tmp_path, share, said):
    """A tenant's share of one stream's window: of eight concurrent DoGets of 10 MB, all but one are refused; of
    less, the gateway refuses to start. Either way the bench says why in one line, not a traceback."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "poc", "bench", "--rows", "200000", "--repetitions", "1",
                          "--concurrency", "8", "--requests", "16", "--single-runs", "1", "--info-calls", "1",
                          "--tunnels", "websocket", "--data-dir", str(tmp_path / "data"),
                          f"--gateway-arg=--max-tenant-buffered-bytes={share}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"bench stopped: {said}" in run.stderr
    assert "Traceback" not in run.stderr
