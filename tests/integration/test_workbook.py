"""The load client, the runner and the papermill notebook, against real processes."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import polars as pl
import psutil
import pytest

from poc.workbook.load.client import LoadConfig, run_load
from poc.workbook.report.build import run_report
from poc.workbook.servers.runner import Cluster

RECORD_FIELDS = {"request_id", "tenant_id", "timestamp", "connect_ms", "metadata_ms", "data_transfer_ms", "total_ms",
                 "queued_ms", "rows_transferred", "bytes", "status", "error"}


def test_load_cli_writes_every_field_and_per_tenant_summaries(cluster, tmp_path):
    out = tmp_path / "load"
    proc = subprocess.run([sys.executable, "-m", "poc", "load", "--flight", cluster.flight_uri,
                           "--tenants", str(cluster.tenants_file), "--requests", "12", "--concurrency", "4",
                           "--tenant-count", "2", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12 requests, 12 ok" in proc.stdout and "total_ms" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["requests"]) == 12 and set(doc["tenants"]) == {"tenant_001", "tenant_002"}
    assert all(RECORD_FIELDS <= set(r) for r in doc["requests"])
    assert {r["tenant_id"] for r in doc["requests"][:2]} == {"tenant_001", "tenant_002"}  # round-robin
    assert all(r["status"] == "success" and r["rows_transferred"] == 200_000 for r in doc["requests"])
    assert doc["summary"]["total_ms"]["p99"] >= doc["summary"]["total_ms"]["p50"] > 0
    frame = pl.read_parquet(out / "results.parquet")
    assert frame.height == 12 and RECORD_FIELDS <= set(frame.columns)


def test_tenant_whose_connector_is_down_counts_as_errors(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False, with_connectors=False) as c:
        c.start_connector("tenant_001")
        c.wait_online(["tenant_001"])
        tokens = {t.tenant_id: t.client_token for t in tenants.values()}
        records = run_load(LoadConfig(c.flight_uri, tokens, requests=10, concurrency=5, timeout_s=20,
                                      progress=False))
    by_tenant = {t: [r for r in records if r.tenant_id == t] for t in tokens}
    assert all(r.status == "success" for r in by_tenant["tenant_001"])
    assert len(by_tenant["tenant_002"]) == 5
    assert all(r.status == "error" and "FlightUnavailableError" in r.error for r in by_tenant["tenant_002"])


def test_hung_server_ends_as_timeout(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], delay_ms="20000", with_direct=False) as c:
        tokens = {"tenant_001": tenants["tenant_001"].client_token}
        records = run_load(LoadConfig(c.flight_uri, tokens, requests=3, concurrency=3, timeout_s=1.5, progress=False))
    assert [r.status for r in records] == ["timeout"] * 3
    assert all(r.metadata_ms is not None and r.data_transfer_ms is None for r in records)
    assert all(1400 <= r.total_ms for r in records)


def test_runner_leaves_no_process_behind_when_the_load_fails(tmp_path, tenants, datasets):
    pids = []
    with pytest.raises(RuntimeError, match="load failed"):
        with Cluster(tmp_path, tenants, datasets["small"]) as c:
            pids = [comp.pid for comp in c.components.values()]
            assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)
            raise RuntimeError("load failed")
    assert pids and not any(psutil.pid_exists(p) for p in pids)


def test_bad_load_parameters_are_refused(cluster, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "poc", "load", "--flight", cluster.flight_uri, "--tenants",
                           str(cluster.tenants_file), "--tenant-count", "9", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "has only 2 tenants" in proc.stderr


def executed(tmp_path: Path, notebook: str, params: str) -> Path:
    """Run `make report`'s path for a parameter file's text; check no cell failed; return the run's folder."""
    path = tmp_path / f"{notebook}.yaml"
    path.write_text(params + f"data_dir: {tmp_path / 'data'}\n")
    out = run_report(path, output_root=str(tmp_path / "outputs"))
    nb = nbformat.read(out / f"{notebook}.ipynb", as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    return out


def shared_text(out: Path, tmp_path: Path) -> str:
    """report.html as a reader sees it, after checking it is fit to share: no code listing, no progress lines,
    no truncated or raw-repr tables, no long unrounded floats, no machine paths; it opens with the answer."""
    page = (out / "report.html").read_text()
    assert str(tmp_path) not in page and str(Path(__file__).resolve().parents[2]) not in page
    text = re.sub(r"<(style|script)\b.*?</\1>", "", page, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    assert "shape: (" not in text and "…" not in text and "requests done" not in text
    assert "Params(" not in text and "import " not in text
    assert not re.findall(r"\d\.\d{4,}", text), re.findall(r".{30}\d\.\d{4,}.{10}", text)
    assert 0 < text.index("Answer") < min(1500, text.index("Machine:"))  # the answer comes first
    return text


def test_smoke_notebook_runs_under_papermill_and_writes_the_report(tmp_path):
    root = Path(__file__).resolve().parents[2]
    params = tmp_path / "smoke.yaml"
    params.write_text((root / "parameters" / "smoke.yaml").read_text()
                      + f"data_dir: {tmp_path / 'data'}\nrequests: 16\ngateway_args: --tunnel-rcvbuf-bytes 300000\n")
    out = run_report(params, output_root=str(tmp_path / "outputs"))
    assert (out / "experiment.ipynb").exists() and (out / "report.html").stat().st_size > 10_000
    nb = nbformat.read(out / "experiment.ipynb", as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})) == 5
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["requests"]) == 48
    assert {r["target"] for r in doc["requests"]} == {"direct", "tunnel", "flight_tunnel"}
    assert all(RECORD_FIELDS | {"websocket_overhead_ms"} <= set(r) for r in doc["requests"])
    assert all(r["websocket_overhead_ms"] is not None for r in doc["requests"] if r["target"] != "direct")
    assert set(doc["summaries"]["tunnel"]["tenants"]) == {"tenant_001", "tenant_002"}
    assert set(doc["summaries"]["flight_tunnel"]["tenants"]) == {"tenant_003", "tenant_004"}
    assert set(doc["compressed_switches"]) == {"tunnel", "flight_tunnel"}  # read from every connector's log
    assert all(set(per) <= {"tenant_001", "tenant_002", "tenant_003", "tenant_004"}
               for per in doc["compressed_switches"].values())
    for name in ("latency_by_tenant_and_phase", "latency_distribution", "overhead_by_phase",
                 "throughput_over_time", "process_resources"):
        assert (out / "charts" / f"{name}.html").exists() and (out / "charts" / f"{name}.png").stat().st_size > 5_000
    success = pl.read_csv(out / "success.csv")
    assert success["metric"].to_list()[0] == "latency P50 (ms)" and success.height == 12
    assert set(success["path"]) == {"tunnel", "flight_tunnel"}
    assert "cores" in success["machine"][0]
    samples = pl.read_parquet(out / "samples.parquet")
    assert {"gateway", "direct", "connector-tenant_001"} <= set(samples["process"].unique().to_list())
    assert "receive buffer of near tunnels 300000 bytes" in (out / "cluster" / "logs" / "gateway.log").read_text()
    text = shared_text(out, tmp_path)
    assert re.search(r"Answer: take the (WebSocket|Flight) tunnel\.", text)
    assert "seed criteria: " in text and "the direct throughput" in text
    criteria = text[text.index("seed target"):text.index("Percentiles per path")]
    for path in ("WebSocket tunnel", "Flight tunnel"):  # every row of the criteria table, both tunnels
        assert criteria.count(path) >= 6 and criteria.count("latency P99 (ms)") == 2


def test_resilience_notebook_measures_faults_and_isolation(tmp_path):
    root = Path(__file__).resolve().parents[2]
    params = tmp_path / "resilience.yaml"
    params.write_text((root / "parameters" / "resilience.yaml").read_text()
                      + f"data_dir: {tmp_path / 'data'}\ntrials: 1\nrows: 50000\n")
    out = run_report(params, output_root=str(tmp_path / "outputs"))
    nb = nbformat.read(out / "resilience.ipynb", as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    trials = pl.read_csv(out / "trials.csv")
    assert sorted(trials["fault"].to_list()) == ["dropped_link", "gateway_restart", "half_open_link"]
    assert trials["recovery_s"].null_count() == 0 and trials["served_after"].all()
    assert trials["silently_short"].sum() == 0
    half_open = trials.filter(pl.col("fault") == "half_open_link")["detection_s"][0]
    assert 1.5 <= half_open <= 6
    assert pl.read_csv(out / "isolation.csv")["passed"].all()
    assert (out / "charts" / "recovery_and_detection.png").exists()
    text = shared_text(out, tmp_path)
    assert "Answer: every fault was recovered from, 0 in-flight requests ended as a silently short table" in text


def test_scale_notebook_measures_idle_tunnels(tmp_path):
    out = executed(tmp_path, "scale", "notebook: scale\ncounts: [50, 100]\ntls_counts: [50]\ncpu_window_s: 2\n"
                                      "latency_calls: 3\n")
    scale = pl.read_csv(out / "scale.csv")
    assert scale["tunnels"].to_list() == [50, 100, 50] and scale["tls"].to_list() == [False, False, True]
    assert scale["register_again_after_restart_s"].null_count() == 0 and (scale["kib_per_idle_tunnel"] > 0).all()
    assert (scale["info_p50_ms_with_idle"] > 0).all() and (out / "charts" / "kib_per_tunnel.png").exists()
    assert "run_scale(params" not in (out / "report.html").read_text()  # the code cells are left out of the report
    text = shared_text(out, tmp_path)
    assert "100 idle tunnels without TLS:" in text and "50 idle tunnels with TLS:" in text


@pytest.mark.parametrize("text, match", [
    ("notebook: nope\n", "notebook must be one of"),
    ("rows: 10\nrequets: 5\n", "unknown parameters \\['requets'\\]"),
    ("rows: 10\ngateway_args: --gil-switch-ms abc\n", "gateway_args.*invalid float value"),
    ("rows: 10\ngateway_args: --tenants 'x\n", "gateway_args.*quotation"),
])
def test_report_refuses_an_unknown_notebook_or_parameter(tmp_path, text, match):
    from poc.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=match):
        run_report(bad, output_root=str(tmp_path))


def test_every_parameter_file_names_a_notebook_and_valid_parameters():
    """What `make report PARAMS=…` reads: each file of parameters/ loads into its notebook's parameters, and
    the file the README's first command uses is the seed's scenario."""
    from poc.workbook.report.build import read_params

    files = sorted((Path(__file__).resolve().parents[2] / "parameters").glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        notebook, params = read_params(path)
        assert notebook.exists(), path
    seed = read_params(files[0].parent / "seed.yaml")[1]
    assert (seed.requests, seed.concurrency, seed.tenant_count, seed.gateway_args) == (1000, 100, 5, "")
    assert read_params(files[0].parent / "seed-bulk.yaml")[1].gateway_arg_list == [
        "--tunnel-rcvbuf-bytes", "0", "--gil-switch-ms", "5"]


def test_scaleout_notebook_runs_replicas_through_a_kill_an_addition_and_a_rolling_restart(tmp_path):
    out = executed(tmp_path, "scaleout", "notebook: scaleout\ntenants: 3\nrows: 20000\nreaders: 2\nphase_s: 4\n"
                                         "cost_calls: 3\nregistry_ttl_s: 3\nrebalance_s: 1\n")
    events = pl.read_csv(out / "events.csv")["event"].to_list()
    assert events[1] == "SIGKILL gw-2" and events[2] == "gw-4 added" and events[-1] == "load stops"
    assert sum("rolling restart" in e for e in events) == 3
    requests = pl.read_csv(out / "requests.csv")
    assert requests.height > 20 and set(requests["through"]) >= {"gw-1", "gw-3", "gw-4"}
    assert requests.filter(pl.col("error").is_null() & (pl.col("rows") != pl.col("expected"))).is_empty()
    assert requests.filter(pl.col("follows_locations"))["read_from"].n_unique() >= 2  # they read from owners
    cost = pl.read_csv(out / "forwarding_cost.csv")
    assert cost["how"].to_list() == ["owner", "forwarded", "redirect"] and (cost["p50_ms"] > 0).all()
    tunnels = pl.read_csv(out / "tunnels.csv")
    assert tunnels.filter(pl.col("gateway") == "gw-4")["tunnels"].max() >= 1  # the added replica took tunnels
    for name in ("requests_per_replica", "tunnels_per_replica", "failover_timeline"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 5_000
    text = shared_text(out, tmp_path)
    assert "SIGKILL of a replica:" in text and "Cost of not reading from the owner" in text


def test_wan_notebook_runs_its_grid_in_a_namespace_of_its_own(tmp_path):
    """Two cells across a 20 ms hop (fixed and adaptive windows), direct across the same hop; the answer and
    every chart reach the report. The host's own loopback is never shaped (the run's namespace is)."""
    before = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    out = executed(tmp_path, "wan", "notebook: wan\nrows: 20000\nrtt_ms: '20'\nmbps: '0'\ncompression: 'off'\n"
                                    "windows: fixed,adaptive\nstreams: 2\nsingle_runs: 1\n")
    table = pl.read_csv(out / "wan.csv")
    assert table.height == 2 and set(table["windows"]) == {"fixed", "adaptive"}
    assert (table["single_mbps"] > 0).all() and (table["direct_single_mbps"] > 0).all()
    assert (table["info_idle_p50_ms"] >= 20).all()  # a 20 ms round trip is the floor of every call
    for name in ("throughput_single_mbps", "throughput_aggregate_mbps", "flightinfo_under_load"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 5_000
    text = shared_text(out, tmp_path)
    assert "The emulator is not the bound" in text and "20 ms, unshaped" in text
    assert subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout == before


def test_corporate_notebook_puts_connectors_behind_a_real_squid_in_a_namespace_of_their_own(tmp_path):
    """Two transports behind squid in a namespace whose only way out is the proxy; one proxy restart each with
    streams resumed (every DoGet in flight exact) and without (every one failed); behind a second squid with a 2 s
    idle timeout, Flight tunnel DoGets paused 7 s with heartbeats every 10 s (cut; resumed or failed) and every
    1 s (nothing cut, its stream connections too); the answer and charts reach the report. The host's own network is never touched (the run's namespace holds everything)."""
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out = executed(tmp_path, "corporate", "notebook: corporate\nrows: 200000\ntransports: picows,flight\nreads: 1\n"
                                          "inflight: 2\nrestarts: 1\nidle_timeout_s: 2\nidle_pause_s: 7\n"
                                          "idle_transports: flight\n")
    table = pl.read_csv(out / "corporate.csv")
    assert table.height == 4 and set(table["transport"]) == {"picows", "flight"}
    resumed, not_resumed = table.filter(pl.col("resume_window_s") > 0), table.filter(pl.col("resume_window_s") == 0)
    assert (resumed["exact"] == 2).all() and (not_resumed["failed"] == 2).all() and table["short"].sum() == 0
    assert (table.filter(pl.col("proxy_mbps").is_not_null())["proxy_mbps"] > 0).all()
    # behind a proxy with an idle timeout: heartbeats further apart get tunnels cut, resumed or failed; inside, none
    idle = pl.read_csv(out / "corporate-idle.csv")
    assert idle.height == 3 and set(idle["transport"]) == {"flight"} and idle["short"].sum() == 0
    cut, kept = idle.filter(pl.col("heartbeat_s") == 10), idle.filter(pl.col("heartbeat_s") == 1)
    assert (cut["cuts"] > 0).all() and (kept["cuts"] == 0).all() and (kept["exact"] == 2).all()
    assert (cut.filter(pl.col("resume_window_s") > 0)["exact"] == 2).all()
    assert (cut.filter(pl.col("resume_window_s") == 0)["failed"] == 2).all()
    for name in ("throughput_through_proxy", "inflight_across_restarts", "inflight_across_idle_cuts"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 5_000
    text = shared_text(out, tmp_path)
    assert "behind one that inspects TLS, the WebSocket tunnel" in text and "a direct connection fails" in text
    assert "Keep the connector's heartbeat inside the proxy's idle timeout" in text
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == before


@pytest.mark.parametrize("source", ["parquet", "postgresql"])
def test_sql_notebook_measures_pushed_down_queries_against_whole_datasets(tmp_path, source):
    """Both paths, both queries, both methods; the selective query moves a small part of the whole dataset's
    bytes through the tunnel (the gateway's own count), and the answer and charts reach the report. With
    source postgresql the table lives in a real PostgreSQL and every query and DoGet runs there."""
    out = executed(tmp_path, "sql", f"notebook: sql\nrows: 20000\nrepetitions: 1\nsource: {source}\n")
    table = pl.read_csv(out / "sql.csv")
    assert table.height == 8
    tunnel = {(r["query"], r["method"].split()[0]): r for r in table.filter(pl.col("path") == "tunnel").to_dicts()}
    assert tunnel[("selective", "sql")]["bytes_moved"] * 20 < tunnel[("selective", "whole")]["bytes_moved"]
    assert tunnel[("selective", "sql")]["result_rows"] == 200 and tunnel[("group_by", "sql")]["result_rows"] == 100
    for name in ("bytes_moved", "p50_ms"):
        assert (out / "charts" / f"{name}.png").stat().st_size > 5_000
    assert "less) and answered in" in shared_text(out, tmp_path)


@pytest.mark.browser
def test_browser_notebook_loads_the_dataset_into_duckdb_wasm_both_ways(tmp_path):
    out = executed(tmp_path, "browser", "notebook: browser\nrows: 20000\nrepetitions: 1\n")
    table = pl.read_csv(out / "browser.csv")
    assert table.height == 2 and set(table["path"]) == {"tunnel", "direct"} and (table["rows"] == 20_000).all()
    assert (table["browser_uss_mb"] > 10).all() and (table["load_s"] > 0).all()
    assert (out / "charts" / "load_seconds.png").stat().st_size > 5_000
    assert "rows into DuckDB-WASM through the tunnel in" in shared_text(out, tmp_path)


def test_the_seed_experiment_reads_from_postgresql_when_asked(tmp_path):
    out = executed(tmp_path, "experiment", "rows: 20000\nrequests: 20\nconcurrency: 5\ntenant_count: 2\n"
                                           "tunnels: websocket\ntimeout_s: 60\nsource: postgresql\n")
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["extraction_ms"]) == 10 and all(ms > 0 for ms in doc["extraction_ms"])
    assert all(r["status"] == "success" for r in doc["requests"]), "a request failed"
    text = shared_text(out, tmp_path)
    assert "read the table from PostgreSQL through ADBC" in text and "read from PostgreSQL" in text
