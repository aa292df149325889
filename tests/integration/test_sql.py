"""Flight SQL through the tunnel, read by real clients: ADBC's Flight SQL driver (DB-API and get_objects),
polars through ADBC, and pyarrow's Flight client for the raw commands. Queries run at each tenant's
connector (DuckDB over its Parquet files); results are compared with the same SQL run here on the same files."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import json
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import psutil
import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_manager import DatabaseError, Error, ProgrammingError

from poc.config import make_tenants
from poc.sql import proto
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer

SELECTIVE = "SELECT id, value, amount FROM sales WHERE id % 100 = 7 ORDER BY id"
GROUP_BY = "SELECT id % 10 AS k, count(*) AS n, sum(amount) AS s FROM sales GROUP BY 1 ORDER BY 1"
FOREVER = "SELECT sum(i) FROM range(10000000000000) t(i)"  # stopped by the connector's time limit
ENDLESS = "SELECT i FROM range(10000000000000) t(i)"  # streams until cancelled


@pytest.fixture(scope="module")
def sql_cluster(tmp_path_factory, datasets, _orders):
    """Tenant 0 serves folder a (sales, orders), tenant 1 folder b (other sales rows), tenant 2 a connector
    started with --no-sql, tenant 3 folder a with small limits (result bytes, query time)."""
    tenants = make_tenants(4)
    ids = list(tenants)
    with Cluster(tmp_path_factory.mktemp("sql"), tenants, datasets["a"], with_connectors=False) as cluster:
        cluster.start_connector(ids[0], data=datasets["a"], extra=("--metrics-port", "0"))
        cluster.start_connector(ids[1], data=datasets["b"])
        cluster.start_connector(ids[2], data=datasets["a"], extra=("--no-sql",))
        cluster.start_connector(ids[3], data=datasets["a"], extra=("--max-result-bytes", "300000",
                                                                   "--query-timeout-s", "1"))
        cluster.wait_online(ids)
        yield cluster, tenants, {ids[0]: datasets["a"], ids[1]: datasets["b"]}


def connect(uri: str, token: str):
    return flight_sql.connect(uri, db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"},
                              autocommit=True)


def query(uri: str, token: str, sql: str) -> pa.Table:
    with connect(uri, token) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetch_arrow_table()


def local(folder, sql: str) -> pa.Table:
    """The same SQL over the same Parquet files, run here."""
    con = duckdb.connect()
    for file in sorted(folder.glob("*.parquet")):
        con.execute(f"CREATE VIEW \"{file.stem}\" AS SELECT * FROM read_parquet('{file}')")
    return con.sql(sql).to_arrow_table()


def assert_same(got: pa.Table, expected: pa.Table) -> None:
    """Equal column by column; float sums within rounding (their order of addition may differ)."""
    assert got.schema.names == expected.schema.names
    assert got.num_rows == expected.num_rows
    for name in got.schema.names:
        a, b = got[name].to_pylist(), expected[name].to_pylist()
        if pa.types.is_floating(got.schema.field(name).type) and name == "s":
            assert a == pytest.approx(b, rel=1e-9)
        else:
            assert a == b, name


def tenant(sql_cluster, index: int):
    cluster, tenants, folders = sql_cluster
    tenant_id = list(tenants)[index]
    return cluster, tenant_id, tenants[tenant_id].client_token, folders.get(tenant_id)


@pytest.mark.parametrize("sql", [SELECTIVE, GROUP_BY], ids=["selective", "group_by"])
def test_adbc_reads_exact_results_for_each_tenant_from_its_own_data(sql_cluster, sql):
    results = []
    for index in (0, 1):
        cluster, _, token, folder = tenant(sql_cluster, index)
        got = query(cluster.flight_uri, token, sql)
        assert_same(got, local(folder, sql))
        results.append(got)
    assert results[0].num_rows > 0
    assert not results[0].equals(results[1])  # two tenants, two connectors, two different tables


def test_a_tenant_sees_only_its_own_connectors_tables(sql_cluster):
    cluster, _, token0, _ = tenant(sql_cluster, 0)
    _, _, token1, _ = tenant(sql_cluster, 1)

    def tables(token):
        with connect(cluster.flight_uri, token) as conn:
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        return {(c["catalog_name"], s["db_schema_name"], t["table_name"])
                for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]}

    assert tables(token0) == {("connector", "main", "orders"), ("connector", "main", "sales")}
    assert tables(token1) == {("connector", "main", "sales")}
    with pytest.raises(ProgrammingError, match="orders"):
        query(cluster.flight_uri, token1, "SELECT count(*) FROM orders")  # tenant 0's table, not tenant 1's
    assert query(cluster.flight_uri, token0, "SELECT count(*) AS n FROM orders")["n"].to_pylist() == [2_000]


def test_get_objects_gives_the_connectors_column_types(sql_cluster, datasets):
    cluster, _, token, folder = tenant(sql_cluster, 0)
    with connect(cluster.flight_uri, token) as conn:
        schema = conn.adbc_get_table_schema("sales")
        types = conn.adbc_get_table_types()
        info = conn.adbc_get_info()
    assert schema == pa.parquet.read_schema(folder / "sales.parquet").remove_metadata()
    assert types == ["TABLE"]
    assert info["vendor_name"] == "poc tunnel gateway"


def test_prepared_statements_through_adbc(sql_cluster):
    cluster, _, token, folder = tenant(sql_cluster, 0)
    with connect(cluster.flight_uri, token) as conn, conn.cursor() as cursor:
        assert cursor.adbc_prepare(GROUP_BY) is None  # prepared; it takes no parameters
        assert cursor.adbc_execute_schema(GROUP_BY).names == ["k", "n", "s"]  # GetSchema
        cursor.execute(GROUP_BY)
        assert_same(cursor.fetch_arrow_table(), local(folder, GROUP_BY))
        cursor.execute(GROUP_BY)  # the same prepared statement, again
        assert cursor.fetch_arrow_table().num_rows == 10


BOUND = ("SELECT id, value, amount FROM sales WHERE id % 100 = ? AND amount > ? AND value <> ? "
         "AND timestamp >= ? ORDER BY id")


def bound_values(when=None):
    return (7, 5000.0, "none", when or datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))


def spliced(values) -> str:
    """The query with its values written in, to run here as the reference (never how the service runs it)."""
    text = BOUND
    for literal in (str(values[0]), repr(values[1]), f"'{values[2]}'", f"TIMESTAMPTZ '{values[3].isoformat()}'"):
        text = text.replace("?", literal, 1)
    return text


def test_bound_parameters_through_adbc_for_each_tenant_and_the_direct_server(sql_cluster):
    results = []
    for index in (0, 1):
        cluster, _, token, folder = tenant(sql_cluster, index)
        for uri in (cluster.flight_uri, cluster.direct_uri) if index == 0 else (cluster.flight_uri,):
            with connect(uri, token) as conn, conn.cursor() as cursor:
                cursor.execute(BOUND, bound_values())
                got = cursor.fetch_arrow_table()
                cursor.execute(BOUND, (13, 9000.0, "none", bound_values()[3]))  # the same statement, new values
                again = cursor.fetch_arrow_table()
            assert_same(got, local(folder, spliced(bound_values())))
            assert_same(again, local(folder, spliced((13, 9000.0, "none", bound_values()[3]))))
            assert 0 < again.num_rows < got.num_rows
        results.append(got)
    assert not results[0].equals(results[1])  # each tenant's values ran on its own data


def test_a_prepared_statement_announces_its_parameters_and_describes_without_values(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    with connect(cluster.flight_uri, token) as conn, conn.cursor() as cursor:
        parameters = cursor.adbc_prepare(BOUND)
        assert parameters.names == ["parameter_1", "parameter_2", "parameter_3", "parameter_4"]
        assert cursor.adbc_execute_schema(BOUND).names == ["id", "value", "amount"]  # no values bound yet


@pytest.mark.parametrize("values, text", [
    ((7, 5000.0), "4 parameter placeholders and 2 values"),
    ((7, "lots", "none", datetime.datetime(2000, 1, 1)), "Could not convert string 'lots'"),
    ((7, decimal.Decimal("1.5"), "none", datetime.datetime(2000, 1, 1)), "parameters may be null, boolean"),
], ids=["count", "type", "unsupported_type"])
def test_wrong_parameters_get_a_clear_error(sql_cluster, values, text):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    with connect(cluster.flight_uri, token) as conn, conn.cursor() as cursor:
        with pytest.raises(Error, match=text):
            cursor.execute(BOUND, values)
            cursor.fetch_arrow_table()
        cursor.execute(BOUND, bound_values())  # the connection is fine
        assert cursor.fetch_arrow_table().num_rows > 0


def test_executemany_is_refused_as_a_write(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    with connect(cluster.flight_uri, token) as conn, conn.cursor() as cursor:
        with pytest.raises(Error, match="read-only"):
            cursor.executemany("SELECT id FROM sales WHERE id = ?", [(1,), (2,)])


def test_parameters_are_bounded_and_a_tampered_handle_is_refused(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    try:
        created = proto.unpack_any(next(iter(client.do_action(flight.Action(
            "CreatePreparedStatement", proto.pack_any(proto.ActionCreatePreparedStatementRequest(BOUND))),
            bearer(token)))).body.to_pybytes())
        descriptor = flight.FlightDescriptor.for_command(proto.pack_any(
            proto.CommandPreparedStatementQuery(created.prepared_statement_handle)))
        for table, text in ((pa.table({"a": [1, 2]}), "2 rows of parameters"),
                            (pa.table({"a": ["x" * 70_000]}), "over"),
                            (pa.table({f"p{i}": [i] for i in range(65)}), "65 parameters"),
                            (pa.table({"a": [[1, 2]]}), "type list")):
            writer, _ = client.do_put(descriptor, table.schema, bearer(token))
            with pytest.raises(pa.ArrowInvalid, match=text):
                writer.write_table(table)
                writer.done_writing()
                writer.close()
        forged = b"poc-sql/2\n" + json.dumps({"sql": "SELECT ?", "params": [{"type": "int", "value": "1"}]}).encode()
        ticket = flight.Ticket(proto.pack_any(proto.TicketStatementQuery(forged)))
        with pytest.raises(pa.ArrowInvalid, match="statement handle"):
            client.do_get(ticket, bearer(token)).read_all()
    finally:
        client.close()


def test_prepared_statement_commands_over_plain_flight(sql_cluster):
    """CreatePreparedStatement → CommandPreparedStatementQuery → DoGet → ClosePreparedStatement, as the JDBC
    driver sends them."""
    cluster, _, token, folder = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    options = bearer(token)
    try:
        body = proto.pack_any(proto.ActionCreatePreparedStatementRequest(SELECTIVE))
        [result] = list(client.do_action(flight.Action("CreatePreparedStatement", body), options))
        created = proto.unpack_any(result.body.to_pybytes())
        assert isinstance(created, proto.ActionCreatePreparedStatementResult)
        assert pa.ipc.read_schema(pa.py_buffer(created.dataset_schema)).names == ["id", "value", "amount"]
        command = proto.pack_any(proto.CommandPreparedStatementQuery(created.prepared_statement_handle))
        info = client.get_flight_info(flight.FlightDescriptor.for_command(command), options)
        table = client.do_get(info.endpoints[0].ticket, options).read_all()
        assert_same(table, local(folder, SELECTIVE))
        close = proto.pack_any(proto.ActionClosePreparedStatementRequest(created.prepared_statement_handle))
        assert list(client.do_action(flight.Action("ClosePreparedStatement", close), options)) == []
    finally:
        client.close()


def test_polars_reads_through_adbc(sql_cluster):
    import polars
    cluster, _, token, folder = tenant(sql_cluster, 1)
    with connect(cluster.flight_uri, token) as conn:
        frame = polars.read_database(GROUP_BY, conn)
    assert frame["n"].to_list() == local(folder, GROUP_BY)["n"].to_pylist()


def test_the_direct_server_answers_the_same_sql(sql_cluster):
    cluster, _, token, folder = tenant(sql_cluster, 0)
    for sql in (SELECTIVE, GROUP_BY):
        assert_same(query(cluster.direct_uri, token, sql), local(folder, sql))


@pytest.mark.parametrize("sql, error, text", [
    ("SELEC id FROM sales", ProgrammingError, "syntax error"),
    ("SELECT nope FROM sales", ProgrammingError, "nope"),
    ("SELECT * FROM no_such_table", ProgrammingError, "no_such_table"),
    ("SELECT * FROM read_csv('/etc/passwd')", DatabaseError, "read_csv is not allowed"),
    ("SELECT * FROM read_parquet('/etc/hostname')", DatabaseError, "read_parquet is not allowed"),
    ("COPY sales TO '/tmp/stolen.csv'", ProgrammingError, "only SELECT"),
    ("ATTACH '/tmp/other.db' AS other", ProgrammingError, "only SELECT"),
    ("INSTALL httpfs", ProgrammingError, "only SELECT"),
    ("SET enable_external_access = true", ProgrammingError, "only SELECT"),
    ("SELECT 1; SELECT 2", ProgrammingError, "one statement"),
    ("SELECT '" + "x" * 70_000 + "'", ProgrammingError, "over the limit"),
    ("   ", ProgrammingError, "empty query"),
], ids=["syntax", "column", "table", "read_csv", "read_parquet", "copy", "attach", "install", "set", "two",
        "too_long", "empty"])
def test_bad_queries_get_the_engines_message(sql_cluster, sql, error, text):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    with pytest.raises(error, match=text):
        query(cluster.flight_uri, token, sql)
    assert query(cluster.flight_uri, token, "SELECT 1 AS one")["one"].to_pylist() == [1]  # the link goes on


@pytest.mark.parametrize("sql", [
    "SELECT current_setting('allowed_paths') AS p",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_views()",
    "SELECT sql FROM duckdb_views",
    "SELECT * FROM '{folder}/sales.parquet'",
    "SELECT * FROM read_parquet('{folder}/sales.parquet')",
    "SELECT nope FROM sales",
    "SELECT * FROM _source_0",
], ids=["current_setting", "settings", "views()", "views", "path", "read_parquet", "error", "source"])
def test_nothing_of_the_connectors_host_reaches_a_client(sql_cluster, sql):
    """Settings, catalogues and engine errors: the client sees a refusal or the engine's message, never a path
    of the connector's host."""
    cluster, _, token, folder = tenant(sql_cluster, 0)
    with pytest.raises(Exception) as refused:
        got = query(cluster.flight_uri, token, sql.format(folder=folder))
        pytest.fail(f"answered: {got.to_pylist()[:3]}")
    text = str(refused.value).replace(f"{folder}/sales.parquet", "<the client's own text>")
    assert str(folder) not in text and "/tmp/" not in text, text


def test_a_query_error_cannot_forge_a_line_of_the_connectors_log(sql_cluster):
    cluster, tenant_id, token, _ = tenant(sql_cluster, 0)
    forged = "2026-01-01 00:00:00,000 INFO poc.connector: tenant_002 registered"
    with pytest.raises(ProgrammingError):
        query(cluster.flight_uri, token, f'SELECT "x\n{forged}" FROM sales')
    log = cluster.components[f"connector-{tenant_id}"].log_tail(200)
    assert "\\n" + forged in log  # the error was logged, on one line, its line break escaped
    assert not any(line.startswith(forged) for line in log.splitlines())


def test_an_unknown_table_is_not_found(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    try:
        command = proto.pack_any(proto.CommandStatementQuery("SELECT * FROM no_such_table"))
        with pytest.raises(pa.ArrowKeyError, match="no_such_table"):
            client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(token))
    finally:
        client.close()


def test_a_connector_without_sql_is_named(sql_cluster):
    cluster, tenant_id, token, _ = tenant(sql_cluster, 2)
    with pytest.raises(Error, match=f"connector of tenant {tenant_id} does not support SQL"):
        query(cluster.flight_uri, token, "SELECT 1")
    with connect(cluster.flight_uri, token) as conn:  # its datasets are still listed
        assert conn.adbc_get_objects(depth="tables").read_all().num_rows == 1


def test_result_bytes_are_bounded_with_an_error_never_a_short_table(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 3)
    with pytest.raises(Error, match="max-result-bytes 300000"):
        query(cluster.flight_uri, token, "SELECT * FROM sales")
    assert query(cluster.flight_uri, token, SELECTIVE).num_rows == 2_000  # under the bound


def test_query_time_is_bounded(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 3)
    start = time.monotonic()
    with pytest.raises(Error, match="query-timeout-s 1"):
        query(cluster.flight_uri, token, FOREVER)
    assert time.monotonic() - start < 30


def _queries_running(cluster, tenant_id) -> float:
    port = cluster.components[f"connector-{tenant_id}"].ready["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("poc_connector_queries "))


def test_a_client_cancel_stops_the_query_at_the_connector(sql_cluster):
    cluster, tenant_id, token, _ = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    try:
        command = proto.pack_any(proto.CommandStatementQuery("SELECT i FROM range(100000000) t(i)"))
        info = client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(token))
        reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
        reader.read_chunk()
        time.sleep(0.5)
        assert _queries_running(cluster, tenant_id) == 1  # paused for credit, not finished
        rss = psutil.Process(cluster.components[f"connector-{tenant_id}"].pid).memory_info().rss
        assert rss < 500e6, rss  # an 800 MB result is streamed, never materialised at the connector
        reader.cancel()
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while _queries_running(cluster, tenant_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _queries_running(cluster, tenant_id) == 0


def test_writes_are_refused(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    try:
        for message in (proto.CommandStatementUpdate(), proto.CommandStatementIngest()):
            descriptor = flight.FlightDescriptor.for_command(proto.pack_any(message))
            with pytest.raises(pa.ArrowNotImplementedError, match="read-only"):
                writer, _ = client.do_put(descriptor, pa.schema([("a", pa.int64())]), bearer(token))
                writer.close()
        with pytest.raises(pa.ArrowNotImplementedError, match="not supported"):
            list(client.do_action(flight.Action("BeginTransaction", b""), bearer(token)))
    finally:
        client.close()


def test_malformed_commands_are_refused_with_a_clear_error(sql_cluster):
    cluster, _, token, _ = tenant(sql_cluster, 0)
    client = flight.connect(cluster.flight_uri)
    bad = [proto.encode_fields((1, proto.TYPE_URL_PREFIX + "CommandStatementQuery"), (2, b"\x0a\xff\xff\xff")),
           proto.encode_fields((1, proto.TYPE_URL_PREFIX + "CommandStatementQuery"), (2, b"\x0a\x02\xff\xfe")),
           proto.encode_fields((1, proto.TYPE_URL_PREFIX + "CommandNoSuchThing"), (2, b""))]
    try:
        for command in bad:
            with pytest.raises((pa.ArrowInvalid, pa.ArrowNotImplementedError)):
                client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(token))
        with pytest.raises(flight.FlightUnauthenticatedError):  # no bearer: nothing is decoded
            client.get_flight_info(flight.FlightDescriptor.for_command(bad[0]))
        ticket = flight.Ticket(proto.pack_any(proto.TicketStatementQuery(b"not a handle of ours")))
        with pytest.raises(pa.ArrowInvalid, match="statement handle"):
            client.do_get(ticket, bearer(token)).read_all()
    finally:
        client.close()
    with contextlib.closing(flight.connect(cluster.flight_uri)) as again:  # the gateway is fine
        assert list(again.list_actions(bearer(token)))
