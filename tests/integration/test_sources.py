"""Connectors on real databases: a real PostgreSQL (Debian's, started here as the `postgres` user) and a SQLite
file, read through ADBC by a connector started with --sources, served through the gateway to Flight and
Flight SQL clients; streaming with credit back to the database cursor, SQL pushed into PostgreSQL, faults."""

from __future__ import annotations

import sqlite3
import time
import urllib.request

import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from poc.config import make_tenants
from poc.workbook.servers.postgres_server import PostgresServer
from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer
from tests.integration.test_sql import connect
from tests.integration.test_sql import query as sql_query

PASSWORD = "s3cret-Pässword"
SECRET_CARD = "4000-1234-5678-9010"  # in a table the role can read and no connector exposes


def write_sources(path, pg: PostgresServer, sqlite_file, orders, **extra) -> None:
    url = pg.url("reader")
    path.write_text(
        "datasets:\n"
        f"  sales: {{url: '{url}', table: public.sales}}\n"
        f"  big: {{url: '{url}', table: big}}\n"
        f"  recent: {{url: '{url}', query: 'SELECT id, amount FROM sales WHERE id < 1000'}}\n"
        f"  events: {{url: 'sqlite://{sqlite_file}', table: events}}\n"
        f"  orders: {{path: '{orders}'}}\n" + "".join(f"{k}: {v}\n" for k, v in extra.items()))


@pytest.fixture(scope="module")
def db(tmp_path_factory, datasets, _orders):
    """PostgreSQL with `sales` (200,000 rows) and `big` (1,000,000), a read-only role; a SQLite file."""
    root = tmp_path_factory.mktemp("sources")
    with PostgresServer(root / "pg", log_statements=True) as pg:
        pg.load("sales", pq.read_table(datasets["a"] / "sales.parquet"))
        pg.load("big", pq.read_table(datasets["large"] / "sales.parquet"))
        pg.load("cards", pa.table({"id": list(range(4990, 5000)), "card_number": [SECRET_CARD] * 10}))
        pg.add_reader("reader", PASSWORD, ["sales", "big", "cards"])  # the role reads more than is exposed
        sqlite_file = root / "events.db"
        with sqlite3.connect(sqlite_file) as lite:
            lite.execute("CREATE TABLE events (id INTEGER, kind TEXT, weight REAL)")
            lite.executemany("INSERT INTO events VALUES (?, ?, ?)", [(i, f"k{i % 7}", i / 3) for i in range(5000)])
        yield pg, sqlite_file, root


@pytest.fixture(scope="module")
def served(db, _orders, tmp_path_factory):
    pg, sqlite_file, root = db
    sources = root / "sources.yaml"
    write_sources(sources, pg, sqlite_file, _orders)
    tenants = make_tenants(1)
    with Cluster(tmp_path_factory.mktemp("served"), tenants, _orders.parent, with_connectors=False,
                 with_direct=False) as cluster:
        cluster.start_connector("tenant_001", data="", extra=("--sources", str(sources), "--metrics-port", "0"),
                                env={"POC_SOURCE_PASSWORD": PASSWORD})
        cluster.wait_online(["tenant_001"])
        yield cluster, tenants["tenant_001"].client_token, pg


def flight_read(cluster, token, name: str, options=None):
    with flight.connect(cluster.flight_uri) as client:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", name), options or bearer(token))
        return info, client.do_get(info.endpoints[0].ticket, options or bearer(token)).read_all()


def by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


def test_postgresql_and_sqlite_tables_arrive_exactly(served, db, _orders):
    cluster, token, pg = served
    info, got = flight_read(cluster, token, "sales")
    expected = pg.query("SELECT * FROM sales")
    assert info.total_records == -1 and info.schema == expected.schema.remove_metadata()  # from the catalogue
    assert by_id(got).equals(by_id(expected.cast(info.schema)))
    _, events = flight_read(cluster, token, "events")
    import adbc_driver_sqlite.dbapi as sqlite_driver

    with sqlite_driver.connect(str(db[1])) as lite, lite.cursor() as cursor:  # what ADBC reads here
        cursor.execute("SELECT * FROM events")
        local = cursor.fetch_arrow_table()
    assert by_id(events).equals(by_id(local)) and events.num_rows == 5000
    _, recent = flight_read(cluster, token, "recent")  # a dataset that is a query
    assert recent.column_names == ["id", "amount"] and recent.num_rows == 1000
    _, orders = flight_read(cluster, token, "orders")  # a Parquet path beside them
    assert orders.equals(pq.read_table(_orders))


def test_sql_over_database_datasets_runs_in_postgresql(served):
    cluster, token, pg = served
    sql = "SELECT id, amount FROM sales WHERE id % 100 = 7 ORDER BY id"
    got = sql_query(cluster.flight_uri, token, sql)
    assert got.equals(pg.query(sql).cast(got.schema))
    joined = sql_query(cluster.flight_uri, token, "SELECT count(*) AS n FROM sales s JOIN recent r ON s.id = r.id")
    assert joined["n"].to_pylist() == [1000]
    # each dataset's name became its own definition, and PostgreSQL ran the query (its statement log)
    assert "FROM (SELECT * FROM public.sales) AS s JOIN (SELECT id, amount FROM sales WHERE id < 1000) AS r" in pg.log


def test_bound_parameters_reach_postgresql_as_parameters_never_as_text(served):
    cluster, token, pg = served
    sql = "SELECT id, amount FROM sales WHERE id % ? = ? AND value <> ? ORDER BY id OFFSET ? LIMIT ?"
    marker = "it's; DROP TABLE sales --"  # bound, it is a value; spliced into the text, it would break the query
    with connect(cluster.flight_uri, token) as conn, conn.cursor() as cursor:
        assert cursor.adbc_prepare(sql).names == [f"parameter_{i}" for i in range(1, 6)]
        cursor.execute(sql, (100, 7, marker, 3, 5))
        got = cursor.fetch_arrow_table()
        with pytest.raises(Exception, match="4 parameter placeholders and 1 values"):
            cursor.execute("SELECT id FROM sales WHERE id < $4 AND id > $1 AND id <> $2 AND id <> $3", (1,))
            cursor.fetch_arrow_table()
    expected = pg.query("SELECT id, amount FROM sales WHERE id % 100 = 7 ORDER BY id OFFSET 3 LIMIT 5")
    assert got.equals(expected.cast(got.schema)) and got.num_rows == 5  # the values in their places
    ran = [line for line in pg.log.splitlines() if "value <> $3" in line]
    assert ran and all("LIMIT $5 OFFSET $4" in line for line in ran)  # PostgreSQL got the placeholders, in order …
    assert "$3 = 'it''s; DROP TABLE sales --'" in pg.log  # … and the value beside them, as a parameter
    assert not [line for line in pg.log.splitlines() if "DROP TABLE sales --" in line and "$3 = " not in line]


@pytest.mark.parametrize("sql, text, mark", [
    ("SELECT * FROM sales FOR UPDATE", "only SELECT", "FOR UPDATE"),
    ("SELECT * INTO stolen FROM sales", "only SELECT", "stolen"),
    ("SELECT pg_read_file('/etc/passwd') FROM sales", "not allowed", "pg_read_file"),
    ("SELECT * FROM sales JOIN orders ON sales.id = orders.id", "Parquet", "orders"),
    ("SELECT * FROM public.big, sales", "no dataset", "big, "),
    ("SELECT 1 FROM sales; DELETE FROM sales", "one statement", "DELETE"),
])
def test_what_is_not_one_select_over_exposed_datasets_never_reaches_the_database(served, sql, text, mark):
    cluster, token, pg = served
    with pytest.raises(Exception, match=text):
        sql_query(cluster.flight_uri, token, sql)
    assert "statement: SELECT" in pg.log  # the log does record what reaches the database
    assert mark not in pg.log


@pytest.fixture(scope="module")
def only_recent(db, tmp_path_factory):
    """A connector exposing one dataset, `recent` (a query over sales: id and amount of the first 1,000 rows),
    through the read-only role, which can read more (`sales` whole, `cards`)."""
    pg, _, root = db
    sources = root / "only-recent.yaml"
    sources.write_text(f"datasets:\n  recent: {{url: '{pg.url('reader')}', query: "
                       "'SELECT id, amount FROM sales WHERE id < 1000'}\n")
    tenants = make_tenants(1)
    with Cluster(tmp_path_factory.mktemp("recent"), tenants, root, with_connectors=False, with_direct=False) as c:
        c.start_connector("tenant_001", data="", extra=("--sources", str(sources)),
                          env={"POC_SOURCE_PASSWORD": PASSWORD})
        c.wait_online(["tenant_001"])
        yield c, tenants["tenant_001"].client_token, pg


@pytest.mark.parametrize("sql, mark", [
    ("SELECT query_to_xml('select id, card_number from cards', true, false, '') FROM recent", "query_to_xml"),
    ("SELECT query_to_xml('select id, value from sales where id >= 4997', true, false, '') AS x FROM recent",
     "query_to_xml"),
    ("SELECT database_to_xml(true, false, '') FROM recent", "database_to_xml"),
    ("SELECT relname FROM pg_class", "pg_class"),
    ("SELECT * FROM recent, pg_catalog.pg_tables", "pg_tables"),
    ("SELECT * FROM information_schema.tables", "information_schema"),
    ("SELECT 'cards'::regclass FROM recent", "regclass"),
    ("SELECT to_regclass('cards') FROM recent", "to_regclass"),
    ("SELECT id::regtype FROM recent", "regtype"),
    ("SELECT ctid, xmin, tableoid FROM recent", None),  # reaches PostgreSQL, where `recent` has no such columns
    ("SELECT current_setting('data_directory') FROM recent", "data_directory"),
    ("SELECT * FROM recent WHERE id IN (SELECT id FROM cards)", "FROM cards)"),
    ("SELECT * FROM cards, (WITH cards AS (SELECT 1) SELECT 1 FROM recent) x", "FROM cards, ("),
    ("WITH a AS (SELECT * FROM cards), cards AS (SELECT 1) SELECT * FROM a, recent", "WITH a AS"),
    ("SELECT * FROM recent, dblink('dbname=shop', 'select 1') AS t(c text)", "dblink"),
    ("SELECT pg_ls_dir('.') FROM recent", "pg_ls_dir"),
    ("SELECT row_to_json(c) FROM recent r, LATERAL (SELECT * FROM cards) c", "row_to_json"),
    ("SELECT * FROM recent UNION ALL SELECT id, card_number::int FROM cards", "card_number::int"),
    ("SELECT (xpath('/row', query_to_xml('select 1', true, false, '')))[1] FROM recent", "xpath"),
], ids=lambda value: str(value)[:40])
def test_sql_pushed_into_a_database_reads_only_the_exposed_datasets(only_recent, sql, mark):
    """The attacks of a client with a valid token on a connector that exposes one query over PostgreSQL,
    through a role that can read more: each is refused — by the allow-list before PostgreSQL sees it, or by
    PostgreSQL for columns the rewritten query does not have — and nothing the dataset hides is answered."""
    cluster, token, pg = only_recent
    with pytest.raises(Exception) as refused:
        got = sql_query(cluster.flight_uri, token, sql)
        pytest.fail(f"answered: {got.to_pylist()[:3]}")
    text = str(refused.value)
    assert any(reason in text for reason in ("not allowed", "no dataset", "does not exist")), text
    assert SECRET_CARD not in text
    if mark is not None:  # refused at the connector: the statement never reached the database
        assert "not allowed" in text or "no dataset" in text, text
        assert mark not in pg.log


def test_the_exposed_dataset_still_answers_queries(only_recent):
    cluster, token, pg = only_recent
    got = sql_query(cluster.flight_uri, token, "SELECT count(*) AS n, max(id) AS top FROM recent WHERE amount >= 0")
    assert got.to_pylist() == pg.query("SELECT count(*) AS n, max(id) AS top FROM sales WHERE id < 1000 "
                                       "AND amount >= 0").to_pylist()


def _reader_backends(pg) -> list[dict]:
    return pg.query("SELECT state, wait_event, query FROM pg_stat_activity WHERE usename = 'reader'").to_pylist()


def test_a_slow_client_slows_the_database_read_and_the_connector_stays_small(served):
    cluster, token, pg = served
    with flight.connect(cluster.flight_uri) as client:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "big"), bearer(token))
        reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=120))
        first = reader.read_chunk().data.num_rows
        time.sleep(2)  # the client reads nothing: credit runs out, the connector stops reading the cursor
        active = [b for b in _reader_backends(pg) if b["state"] == "active"]
        assert active and active[0]["wait_event"] == "ClientWrite", active  # PostgreSQL waits for the connector
        rss = psutil.Process(cluster.components["connector-tenant_001"].pid).memory_info().rss
        assert rss < 400e6, rss  # the 1,000,000-row table (50 MB) is streamed, not held
        rest = reader.read_all()
    assert first + rest.num_rows == 1_000_000  # then everything, once the client reads again
    assert _reader_backends(pg) == [] or all(b["state"] != "active" for b in _reader_backends(pg))


def test_a_cancelled_stream_cancels_the_postgresql_backend(served):
    cluster, token, pg = served
    with flight.connect(cluster.flight_uri) as client:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "big"), bearer(token))
        reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=120))
        reader.read_chunk()
        time.sleep(1)
        assert any(b["state"] == "active" for b in _reader_backends(pg))
        reader.cancel()
    deadline = time.monotonic() + 10
    while any(b["state"] == "active" for b in _reader_backends(pg)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(b["state"] == "active" for b in _reader_backends(pg))


def test_a_query_past_its_time_limit_is_stopped_in_the_database(db, _orders, tmp_path):
    pg, sqlite_file, _ = db
    sources = tmp_path / "sources.yaml"
    write_sources(sources, pg, sqlite_file, _orders)
    tenants = make_tenants(1)
    with Cluster(tmp_path / "c", tenants, _orders.parent, with_connectors=False, with_direct=False) as cluster:
        cluster.start_connector("tenant_001", data="", extra=("--sources", str(sources), "--query-timeout-s", "1"),
                                env={"POC_SOURCE_PASSWORD": PASSWORD})
        cluster.wait_online(["tenant_001"])
        start = time.monotonic()
        with pytest.raises(Exception, match="query-timeout-s 1"):
            sql_query(cluster.flight_uri, tenants["tenant_001"].client_token,
                      "SELECT count(*) AS n FROM sales a, sales b WHERE a.amount + b.amount < 0")
        assert time.monotonic() - start < 20
    assert "canceling statement" in pg.log


def test_database_down_at_start_then_back_and_gone_mid_stream(tmp_path, datasets, _orders):
    """The connector registers without its database and says why for those datasets; serves them once the
    database is back, with no restart; a database gone mid-stream is an error at the client, never a short
    table."""
    tenants = make_tenants(1)
    token = tenants["tenant_001"].client_token
    pg = PostgresServer(tmp_path / "pg")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"datasets:\n  big: {{url: '{pg.url('reader')}', table: big}}\n"
                       f"  orders: {{path: '{_orders}'}}\n")
    try:
        with Cluster(tmp_path / "c", tenants, _orders.parent, with_connectors=False, with_direct=False) as cluster:
            cluster.start_connector("tenant_001", data="", extra=("--sources", str(sources)),
                                    env={"POC_SOURCE_PASSWORD": PASSWORD})
            cluster.wait_online(["tenant_001"])
            with pytest.raises(flight.FlightUnavailableError, match="cannot read its database"):
                flight_read(cluster, token, "big")
            assert flight_read(cluster, token, "orders")[1].num_rows == 2000  # the files are served meanwhile
            pg.start()
            pg.load("big", pq.read_table(datasets["large"] / "sales.parquet"))
            pg.add_reader("reader", PASSWORD, ["big"])
            assert flight_read(cluster, token, "big")[1].num_rows == 1_000_000  # back, without a restart
            with flight.connect(cluster.flight_uri) as client:
                info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "big"), bearer(token))
                reader = client.do_get(info.endpoints[0].ticket, bearer(token, timeout=60))
                rows = reader.read_chunk().data.num_rows
                pg.stop()  # fast shutdown: the backend ends mid-stream
                with pytest.raises(flight.FlightError, match="database|connector"):
                    for chunk in reader:
                        rows += chunk.data.num_rows
            assert rows < 1_000_000
    finally:
        pg.close()


def test_a_wrong_password_is_a_clear_error_and_never_logged(db, _orders, tmp_path):
    pg, sqlite_file, _ = db
    sources = tmp_path / "sources.yaml"
    wrong = "wrong-Password-42"
    (tmp_path / "pw").write_text(wrong + "\n")
    write_sources(sources, pg, sqlite_file, _orders, password_file="pw")
    tenants = make_tenants(1)
    with Cluster(tmp_path / "c", tenants, _orders.parent, with_connectors=False, with_direct=False) as cluster:
        cluster.start_connector("tenant_001", data="", extra=("--sources", str(sources)))
        cluster.wait_online(["tenant_001"])
        with pytest.raises(flight.FlightUnavailableError, match="password authentication failed") as raised:
            flight_read(cluster, tenants["tenant_001"].client_token, "sales")
        assert wrong not in str(raised.value)
        logs = "".join(p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log"))
    assert "password authentication failed" in logs and wrong not in logs


def test_a_password_in_a_url_is_used_and_never_shown(tmp_path):
    from poc.sources import load_sources
    from poc.sources.database import source_error

    (tmp_path / "s.yaml").write_text("datasets: {s: {url: 'postgresql://u:p%40ss@127.0.0.1:1/db', table: t}}")
    database = load_sources(tmp_path / "s.yaml")["s"].database
    assert "p%40ss" not in database.url and "p@ss" not in database.url
    assert "p@ss" not in str(source_error(database, RuntimeError("login as u with p@ss failed")))


@pytest.mark.parametrize("text, error", [
    ("datasets: {s: {url: 'mysql://h/db', table: t}}", "scheme"),
    ("datasets: {s: {url: 'postgresql://h/db'}}", "exactly one of table and query"),
    ("datasets: {'bad name': {path: x.parquet}}", "not a dataset name"),
    ("nothing: here", "datasets"),
])
def test_a_bad_sources_file_is_refused_with_the_reason(tmp_path, text, error):
    from poc.config import ConfigError
    from poc.sources import load_sources

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_sources(tmp_path / "s.yaml")


def test_rows_read_from_databases_are_counted(served):
    cluster, token, _ = served
    flight_read(cluster, token, "recent")
    port = cluster.components["connector-tenant_001"].ready["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counted = next(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("poc_connector_query_rows_total "))
    assert counted >= 1000


def test_requests_beyond_the_connection_limit_wait_for_one(db, _orders, tmp_path):
    """--db-connections 1: three DoGets at once are served one after the other on one connection, none fails."""
    import concurrent.futures

    pg, sqlite_file, _ = db
    sources = tmp_path / "sources.yaml"
    write_sources(sources, pg, sqlite_file, _orders)
    tenants = make_tenants(1)
    token = tenants["tenant_001"].client_token
    with Cluster(tmp_path / "c", tenants, _orders.parent, with_connectors=False, with_direct=False) as cluster:
        cluster.start_connector("tenant_001", data="", extra=("--sources", str(sources), "--db-connections", "1"),
                                env={"POC_SOURCE_PASSWORD": PASSWORD})
        cluster.wait_online(["tenant_001"])
        flight_read(cluster, token, "sales")  # the schema is known from now on: no connection for it
        seen = []
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            reads = [pool.submit(flight_read, cluster, token, "big") for _ in range(3)]
            while not all(r.done() for r in reads):
                seen.append(sum(1 for b in _reader_backends(pg) if b["state"] == "active"))
                time.sleep(0.05)
        assert [r.result()[1].num_rows for r in reads] == [1_000_000] * 3
        assert max(seen) == 1 and seen.count(1) > 3
