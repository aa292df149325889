"""Configuration files, option parsing, backoff and the dataset catalog."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from poc.catalog import Dataset, cut_batches, load_datasets
from poc.config import ConfigError, load_tenants, make_tenants, parse_delay, write_tenants
from poc.connector import backoff_delay
from poc.workbook.dataset import SCHEMA, make_table, write_dataset


def test_tenants_file_roundtrip(tmp_path):
    tenants = make_tenants(3, seed=1)
    assert load_tenants(write_tenants(tmp_path / "t.yaml", tenants)) == tenants
    assert "token" not in repr(tenants["tenant_001"]).replace("TenantCredentials", "")


@pytest.mark.parametrize("text, match", [
    ("tenants: {}", "non-empty 'tenants:'"),
    ("tenants: [1]", "non-empty 'tenants:'"),
    ("tenants: {a: 1}", "must be a mapping"),
    ("tenants: {a: {connector_token: short, client_token: longenough}}", "connector_token of at least 8"),
    ("tenants: {a: {connector_token: longenough}}", "client_token"),
    ("tenants: [unclosed", "not valid YAML"),
    ("tenants: {a: {connector_token: aaaaaaaa, client_token: samesame},"
     " b: {connector_token: bbbbbbbb, client_token: samesame}}", "'a' and 'b' have the same client_token"),
])
def test_bad_tenants_files_say_what_is_wrong(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_tenants(path)


def test_a_client_token_finds_its_tenant_among_ten_thousand():
    from poc.auth import TenantTokens

    tenants = make_tenants(10_000, seed=3)
    tokens = TenantTokens(tenants, "client_token")
    for tenant in (tenants["tenant_001"], tenants["tenant_5000"], tenants["tenant_10000"]):
        assert tokens.tenant_for(tenant.client_token) == tenant.tenant_id
    some = tenants["tenant_042"].client_token
    for wrong in ("", some[:-1], some + "0", some.upper(), tenants["tenant_042"].connector_token):
        assert tokens.tenant_for(wrong) is None


def test_missing_tenants_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read tenants file"):
        load_tenants(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, expected", [("200-250", (200.0, 250.0)), ("0", (0.0, 0.0)), ("5", (5.0, 5.0))])
def test_parse_delay(text, expected):
    assert parse_delay(text) == expected


@pytest.mark.parametrize("text", ["250-200", "-5", "a-b", "1-2-3", ""])
def test_parse_delay_rejects_nonsense(text):
    with pytest.raises(ConfigError):
        parse_delay(text)


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 30, rng) for n in range(12)]
    for n, d in enumerate(delays):
        base = min(30, 0.5 * 2 ** n)
        assert base / 2 <= d <= base
    assert len({round(backoff_delay(3, 0.5, 30, rng), 6) for _ in range(20)}) > 10  # jittered


def test_dataset_is_deterministic_and_about_50_bytes_a_row():
    a, b = make_table(10_000, seed=3), make_table(10_000, seed=3)
    assert a.equals(b) and not a.equals(make_table(10_000, seed=4))
    assert a.schema == SCHEMA and a.column("id").to_pylist()[:3] == [0, 1, 2]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, a.schema) as writer:
        writer.write_table(a)
    assert 45 <= sink.getvalue().size / a.num_rows <= 55


def test_catalog_loads_a_file_or_a_folder(tmp_path):
    write_dataset(1000, tmp_path / "sales.parquet")
    write_dataset(10, tmp_path / "orders.parquet")
    assert sorted(load_datasets(tmp_path)) == ["orders", "sales"]
    assert list(load_datasets(tmp_path / "sales.parquet")) == ["sales"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_datasets(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.parquet"):
        load_datasets(tmp_path / "empty")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="cannot read Parquet"):
        load_datasets(tmp_path / "bad.parquet")


def test_batches_are_cut_to_size_and_refit_to_a_smaller_frame():
    table = make_table(50_000)
    batches = cut_batches(table, 256 * 1024)
    assert pa.Table.from_batches(batches).equals(table) and len(batches) > 5
    ds = Dataset("sales", table.schema, batches)
    fitted = ds.messages_within(64 * 1024)
    assert all(m.size <= 64 * 1024 for m in fitted)
    rebuilt = pa.Table.from_batches([pa.ipc.read_record_batch(pa.ipc.read_message(m), table.schema) for m in fitted])
    assert rebuilt.equals(table)
    assert ds.ipc_bytes == ds.schema_message.size + sum(m.size for m in ds.batch_messages)


@pytest.mark.parametrize("value", ["0", "-1", "101", "nan"])
def test_the_gateway_refuses_a_gil_switch_interval_out_of_range(tmp_path, value, capsys):
    from poc.cli import main

    write_tenants(tmp_path / "tenants.yaml", make_tenants(1))
    assert main(["gateway", "--tenants", str(tmp_path / "tenants.yaml"), "--gil-switch-ms", value]) == 2
    assert "--gil-switch-ms must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize("url, says", [
    ("grpc://127.0.0.1:8444", "the gRPC tunnel is retired; dial the Flight tunnel, flight://HOST:PORT"),
    ("grpcs://gw.example:8444", "the gRPC tunnel is retired"),
    ("http://127.0.0.1:8443/connect", "--gateway must be ws[s]://HOST:PORT/connect (WebSocket tunnel) or "
                                      "flight[+tls]://HOST:PORT"),
])
def test_the_connector_names_the_tunnels_it_dials(tmp_path, url, says, capsys, monkeypatch):
    from poc.cli import main

    monkeypatch.setenv("POC_CONNECTOR_TOKEN", "x")
    assert main(["connector", "--gateway", url, "--tenant", "tenant_001", "--data", str(tmp_path)]) == 2
    assert says in capsys.readouterr().err


def test_the_gateway_refuses_a_frame_allocator_it_does_not_know(tmp_path, capsys, monkeypatch):
    from poc.cli import main

    write_tenants(tmp_path / "tenants.yaml", make_tenants(1))
    monkeypatch.setenv("POC_FRAME_ALLOCATOR", "tcmalloc")  # the environment's default is checked as the option is
    assert main(["gateway", "--tenants", str(tmp_path / "tenants.yaml")]) == 2
    assert "unknown frame allocator 'tcmalloc': one of jemalloc, mimalloc, system" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["jemalloc", "mimalloc", "system"])
def test_frames_are_copied_into_the_allocator_the_gateway_chose(name):
    """picows' frames are copied out of its read buffer into Arrow buffers of the chosen allocator
    (poc.transports.memory): the bytes are there, in that pool, until the buffer goes."""
    from poc.transports import memory

    try:
        pool = memory.use(name)
        before = pool.bytes_allocated()
        frame = memory.arrow_copy(memoryview(b"\x00\x01" * 50_000))
        assert frame.to_pybytes() == b"\x00\x01" * 50_000 and memory.frame_pool() is pool
        assert pool.bytes_allocated() >= before + 100_000
        del frame
        assert pool.bytes_allocated() == before
    finally:
        memory.use(None)


def test_a_command_stopped_by_a_bad_setting_prints_its_error_after_every_line_it_logged(tmp_path, capsys,
                                                                                       monkeypatch):
    """The log has a thread of its own that writes when it can; the error must still come last, where a reader
    (and the bench, which quotes a component's last line) looks for it. The writer is slowed down here so that,
    without the flush, the error would come first."""
    import logging
    import time

    from poc.cli import main

    emit = logging.StreamHandler.emit

    def slow_emit(self, record):
        time.sleep(0.2)
        emit(self, record)

    monkeypatch.setattr(logging.StreamHandler, "emit", slow_emit)
    write_tenants(tmp_path / "tenants.yaml", make_tenants(1))
    assert main(["gateway", "--tenants", str(tmp_path / "tenants.yaml"), "--max-tenant-buffered-bytes",
                 "1048576"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any("open-files limit" in line for line in lines[:-1])
    assert lines[-1].startswith("error: --max-tenant-buffered-bytes must be 0 or at least")


def test_without_a_choice_frames_go_to_jemalloc_or_where_pyarrow_has_none_to_its_default_pool(monkeypatch):
    """The gateway's default: jemalloc (docs/results.md), and on a pyarrow built without it Arrow's default pool
    rather than a gateway that does not start; naming jemalloc there is an error that says what there is."""
    import pyarrow as pa

    from poc.transports import memory

    try:
        assert memory.use(None).backend_name == "jemalloc"
        monkeypatch.setattr(pa, "supported_memory_backends", lambda: ["mimalloc", "system"])
        monkeypatch.setattr(pa, "jemalloc_memory_pool", lambda: (_ for _ in ()).throw(NotImplementedError()))
        assert memory.use(None).backend_name == pa.default_memory_pool().backend_name == "mimalloc"
        with pytest.raises(ConfigError, match="this pyarrow was built without jemalloc: choose one of mimalloc, system"):
            memory.use("jemalloc")
    finally:
        monkeypatch.undo()
        memory.use(None)
