"""Flight SQL's protobuf messages as the gateway decodes them, the tunnel's 1.5 query requests in the core,
and the connector's SQL sandbox — no processes."""

from __future__ import annotations

import datetime
import re

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poc.sql import proto
from poc.sql.engine import SqlEngine, SqlError
from poc.sql.patterns import MAX_PATTERN_CHARS
from poc.sql.service import like, sql_command, sql_info_table
from poc.tunnel import ConnectorEndpoint, GatewayEndpoint, LocalProtocolError
from poc.tunnel import events as ev
from poc.tunnel import params
from poc.tunnel.messages import parse_message
from tests.unit.test_core import LIMITS, deliver

# -- the protobuf decoder


@pytest.mark.parametrize("message", [
    proto.CommandStatementQuery("SELECT 1 — ünïcode"), proto.CommandStatementQuery("SELECT 1", b"tx"),
    proto.TicketStatementQuery(b"\x00handle\xff"), proto.CommandPreparedStatementQuery(b"h"),
    proto.ActionCreatePreparedStatementRequest("SELECT 2"),
    proto.ActionCreatePreparedStatementResult(b"h", b"schema", b""),
    proto.ActionClosePreparedStatementRequest(b"h"), proto.CommandGetSqlInfo((0, 1, 2, 504, 2**32 - 1)),
    proto.CommandGetCatalogs(), proto.CommandGetTableTypes(), proto.CommandGetDbSchemas("connector", "m%"),
    proto.CommandGetTables(None, None, "s_l%", ("TABLE", "VIEW"), True), proto.CommandGetTables(),
])
def test_messages_round_trip_through_any(message):
    assert proto.unpack_any(proto.pack_any(message)) == message


def test_repeated_uint32_is_read_packed_and_unpacked():
    packed = proto.encode_fields((1, bytes([0, 1, 0xF8, 0x03])))  # 0, 1, 504 as one packed run
    assert proto.CommandGetSqlInfo.decode(packed).info == (0, 1, 504)
    assert proto.CommandGetSqlInfo.decode(proto.encode_fields((1, 0), (1, 504))).info == (0, 504)


def test_unknown_fields_are_skipped_as_protobuf_requires():
    body = proto.encode_fields((1, "SELECT 1"), (9, 12345), (10, b"future")) + b"\x5d" + b"\x00" * 4  # fixed32
    assert proto.CommandStatementQuery.decode(body).query == "SELECT 1"


@pytest.mark.parametrize("body, match", [
    (b"\x0a\x05abc", "claims 5 bytes"),
    (b"\x0a", "truncated varint"),
    (b"\x0a" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x0b", "groups"),
    (b"\x0a\x02\xff\xfe", "UTF-8"),
    (b"\x08\x01", "wrong wire type"),
    (b"\x00\x01", "field number 0"),
    (b"\x09\x00", "truncated fixed-width"),
])
def test_malformed_bodies_are_refused(body, match):
    with pytest.raises(proto.ProtoError, match=match):
        proto.CommandStatementQuery.decode(body)


def test_bytes_that_are_not_flight_sql_are_left_alone_and_unknown_commands_named():
    assert sql_command(b"eyJ0IjoxfQ.c2ln") is None  # a dataset ticket
    assert sql_command(proto.encode_fields((1, "type.googleapis.com/other.Message"), (2, b""))) is None
    with pytest.raises(pa.ArrowNotImplementedError, match="CommandGetXdbcTypeInfo"):
        sql_command(proto.encode_fields((1, proto.TYPE_URL_PREFIX + "CommandGetXdbcTypeInfo"), (2, b"")))
    with pytest.raises(pa.ArrowInvalid, match="over the limit"):
        sql_command(b"\x00" * (proto.MAX_COMMAND_BYTES + 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(sorted(proto.MESSAGES)))
def test_any_bytes_decode_to_a_message_or_a_clear_error(body, name):
    """Whatever a client sends as a command's body, the gateway gets a message or ArrowInvalid, nothing else."""
    data = proto.encode_fields((1, proto.TYPE_URL_PREFIX + name), (2, body))
    try:
        assert isinstance(sql_command(data), proto.MESSAGES[name])
    except pa.ArrowInvalid:
        pass


def test_like_patterns():
    assert like("sa%")("sales") and like("s_les")("sales") and not like("s_les")("ssales")
    assert like(None)("anything") and like("a.b")("a.b") and not like("a.b")("axb")


def test_sql_info_is_a_dense_union_with_the_requested_rows():
    table = sql_info_table((0, 3, 504, 9999))
    assert table.column("info_name").to_pylist() == [0, 3, 504]  # an unknown id is left out
    assert table.column("value").to_pylist() == ["poc tunnel gateway", True, '"']
    assert table.schema.field("value").type.mode == "dense"


# -- the tunnel's 1.5 requests


def sql_pair(sql: str | None, max_params: int | None = None):
    gateway, connector = GatewayEndpoint(LIMITS), ConnectorEndpoint()
    connector.register("t1", "token", ["sales"], codecs=[], sql=sql, max_params=max_params)
    deliver(connector, gateway)
    gateway.accept("sess", heartbeat_s=60)
    deliver(gateway, connector)
    return gateway, connector


def test_query_requests_reach_a_connector_that_speaks_sql():
    gateway, connector = sql_pair("duckdb")
    assert gateway.sql == "duckdb"
    rid = gateway.request_flight_info("(sql)", sql="SELECT 1")
    sid = gateway.open_stream("(sql)", sql="SELECT 2")
    info, stream = deliver(gateway, connector)
    assert info == ev.FlightInfoRequested(rid, "", None, "SELECT 1")
    assert stream == ev.StreamRequested(sid, "", LIMITS.initial_window, None, "SELECT 2")


def test_no_query_is_sent_to_a_connector_whose_register_had_no_sql():
    gateway, _ = sql_pair(None)
    with pytest.raises(LocalProtocolError, match="SQL"):
        gateway.open_stream("(sql)", sql="SELECT 1")
    with pytest.raises(LocalProtocolError, match="SQL"):
        gateway.request_flight_info("(sql)", sql="SELECT 1")


VALUES = [{"type": "int", "value": 7}, {"type": "string", "value": "EU"}, {"type": "null"},
          {"type": "date", "value": "2024-02-29"}, {"type": "timestamp", "value": "2024-02-29T10:00:00+01:00"},
          {"type": "binary", "value": "AAE="}, {"type": "float", "value": 1.5}, {"type": "bool", "value": False}]


def test_bound_values_reach_a_17_connector_typed():
    gateway, connector = sql_pair("duckdb", max_params=64)
    rid = gateway.request_flight_info("(sql)", sql="SELECT ?", params=VALUES)
    sid = gateway.open_stream("(sql)", sql="SELECT ?", params=VALUES[:1])
    info, stream = deliver(gateway, connector)
    assert info.params == VALUES and info.request_id == rid
    assert stream.params == VALUES[:1] and stream.stream_id == sid
    assert params.to_python(VALUES) == [7, "EU", None, datetime.date(2024, 2, 29),
                                        datetime.datetime(2024, 2, 29, 10, tzinfo=datetime.timezone(
                                            datetime.timedelta(hours=1))), b"\x00\x01", 1.5, False]
    assert [params.from_python(v) for v in params.to_python(VALUES)][:2] == VALUES[:2]


def test_no_values_go_to_a_connector_that_binds_none_or_fewer():
    gateway, _ = sql_pair("duckdb")  # a 1.5 connector: no max_params
    gateway.request_flight_info("(sql)", sql="SELECT 1", params=[])  # none bound: fine
    with pytest.raises(LocalProtocolError, match="at most 0 parameters"):
        gateway.open_stream("(sql)", sql="SELECT ?", params=VALUES[:1])
    gateway, _ = sql_pair("duckdb", max_params=2)
    with pytest.raises(LocalProtocolError, match="at most 2 parameters"):
        gateway.request_flight_info("(sql)", sql="SELECT ?, ?, ?", params=VALUES[:3])


@pytest.mark.parametrize("values, error", [
    ({"type": "int", "value": 1}, "must be a list"),
    ([{"type": "int", "value": 2**63}], "within int64"),
    ([{"type": "int", "value": True}], "not of type int"),
    ([{"type": "float", "value": "nan"}], "not of type float"),
    ([{"type": "decimal", "value": "1.5"}], "one of null, bool"),
    ([{"type": "int", "value": 1, "extra": 2}], "one of null, bool"),
    ([{"type": "null", "value": 0}], "a null has no value"),
    ([{"type": "date", "value": "2024-02-30"}], "YYYY-MM-DD"),
    ([{"type": "binary", "value": "%%%"}], "base64"),
    ([{"type": "string", "value": "\ud800"}], "not of type string"),
    ([{"type": "null"}] * 65, "65 parameters"),
    ([{"type": "string", "value": "x" * 40_000}] * 2, "over 65536 bytes"),
])
def test_values_outside_the_allow_list_are_refused_with_the_reason(values, error):
    with pytest.raises(params.ParamError, match=error):
        params.check(values)


def test_a_query_with_bad_values_is_refused_alone_and_the_link_stays():
    gateway, connector = sql_pair("duckdb", max_params=64)
    text = '{"action":"query","request_id":1,"sql":"SELECT ?","window":8388608,"params":[{"type":"int","value":"7"}]}'
    [refused] = connector.receive_text(text)
    assert isinstance(refused, ev.RequestRefused) and "not of type int" in refused.reason
    [error] = connector.data_to_send()
    assert parse_message(error).code == "invalid_request"
    assert connector.state.name == "REGISTERED"


def test_register_of_a_14_connector_has_no_sql_field():
    connector = ConnectorEndpoint()
    connector.register("t1", "token", ["sales"], codecs=[])
    [text] = connector.data_to_send()
    assert '"sql"' not in text and parse_message(text).sql is None


# -- the connector's sandbox


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("sql")
    import pyarrow.parquet as pq
    (root / "data").mkdir()
    (root / "outside").mkdir()
    pq.write_table(pa.table({"id": list(range(100)), "v": [float(i) for i in range(100)]}), root / "data" / "t.parquet")
    pq.write_table(pa.table({"secret": [1]}), root / "outside" / "s.parquet")
    built = SqlEngine({"t": root / "data" / "t.parquet"}, {"mem": pa.table({"a": [1, 2, 3]})})
    yield built, root
    built.close()


@pytest.mark.parametrize("sql, code", [
    ("SELECT * FROM read_parquet('{root}/outside/s.parquet')", "forbidden"),
    ("SELECT * FROM '{root}/outside/s.parquet'", "not_found"),
    ("SELECT * FROM read_text('/etc/hostname')", "forbidden"),
    ("SELECT * FROM glob('{root}/*')", "forbidden"),
    ("COPY t TO '{root}/out.csv'", "invalid_request"),
    ("EXPORT DATABASE '{root}/dump'", "invalid_request"),
    ("ATTACH '{root}/x.db'", "invalid_request"),
    ("INSTALL httpfs", "invalid_request"),
    ("LOAD httpfs", "invalid_request"),
    ("SET enable_external_access = true", "invalid_request"),
    ("PRAGMA database_list", "invalid_request"),
    ("CREATE TABLE x AS SELECT 1", "invalid_request"),
    ("SELECT 1; DROP VIEW t", "invalid_request"),
    ("SELECT * FROM nope", "not_found"),
    ("SELECT nope FROM t", "invalid_request"),
    ("SELECT current_setting('allowed_paths')", "forbidden"),
    ("SELECT * FROM duckdb_settings()", "forbidden"),
    ("SELECT * FROM duckdb_views()", "forbidden"),
    ("SELECT sql FROM duckdb_views", "not_found"),
    ("SELECT * FROM information_schema.tables", "not_found"),
    ("SELECT * FROM _source_0", "not_found"),
    ("SELECT getenv('HOME')", "forbidden"),
    ("SELECT * FROM query('SELECT 1')", "forbidden"),
    ("WITH a AS (SELECT * FROM duckdb_views), duckdb_views AS (SELECT 1) SELECT * FROM a", "not_found"),
    ("SELECT * FROM t, (WITH sqlite_master AS (SELECT 1) SELECT 1) x, sqlite_master", "not_found"),
    ("SELECT 'x'::REGCLASS", "forbidden"),
    ("SELECT list_transform([1], x -> x)", "forbidden"),
    ("SELECT version()", "forbidden"),
])
def test_nothing_reaches_outside_the_datasets(engine, sql, code):
    built, root = engine
    with pytest.raises(SqlError) as raised:
        query = built.start(sql.format(root=root))
        built.read(query)
    assert raised.value.code == code
    assert not (root / "out.csv").exists() and not (root / "dump").exists() and not (root / "x.db").exists()


def test_no_path_of_the_host_reaches_the_catalogue_or_an_error(engine):
    """The views read the datasets by neutral names; error texts have the files' paths cut out."""
    built, root = engine
    cursor = built._cursor()
    views = " ".join(str(row) for row in cursor.execute("SELECT sql FROM duckdb_views()").fetchall())
    cursor.close()
    assert str(root) not in views and "_source_" in views
    error = built._error(RuntimeError(f"IO Error: cannot read {root / 'data' / 't.parquet'} in {root / 'data'}"))
    assert str(root) not in str(error) and "<dataset>" in str(error)


def test_analysts_queries_pass_the_allow_list(engine):
    built, _ = engine
    for sql in ("SELECT id % 10 AS k, count(*) AS n, sum(v) AS s FROM t GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
                "WITH x AS (SELECT id, v FROM t WHERE v BETWEEN 1 AND 50) SELECT max(v), avg(v) FROM x",
                "SELECT id, lag(v) OVER (ORDER BY id), row_number() OVER (PARTITION BY id % 3 ORDER BY v) FROM T",
                "SELECT CASE WHEN id IN (1, 2) THEN 'a' ELSE lower('B') END, CAST(v AS INTEGER), coalesce(v, 0) FROM t",
                "SELECT i FROM range(3) r(i) UNION ALL SELECT id FROM t WHERE id < 2 AND EXISTS (SELECT 1 FROM mem)"):
        query = built.start(sql)
        assert built.read(query) is not None


def test_the_datasets_are_queried_by_name_and_catalog(engine):
    built, _ = engine
    assert built.names == ["mem", "t"]
    query = built.start("SELECT count(*) AS n, sum(v) AS s FROM connector.main.t")
    assert built.read(query).to_pylist() == [{"n": 100, "s": 4950.0}]
    assert built.read(query) is None
    assert built.schema("SELECT a FROM mem").names == ["a"]


def test_query_text_is_bounded(engine):
    built, _ = engine
    with pytest.raises(SqlError, match="over the limit"):
        built.check("SELECT '" + "x" * built.max_query_bytes + "'")


def test_an_interrupted_query_ends_with_an_error(engine):
    built, _ = engine
    query = built.open("SELECT sum(i) FROM range(10000000000000) t(i)")
    import threading
    threading.Timer(0.2, query.interrupt, (True,)).start()
    with pytest.raises(SqlError) as raised:
        built.run(query)
    assert raised.value.code == "timed_out"


@given(st.text("ab_%", max_size=8), st.text("ab", max_size=8))
def test_like_agrees_with_a_regular_expression_on_short_patterns(pattern, name):
    reference = re.fullmatch("".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern),
                             name, re.DOTALL)
    assert like(pattern)(name) == (reference is not None)


@pytest.mark.timeout(60)
def test_a_pattern_of_many_percent_signs_is_matched_without_backtracking():
    """A backtracking matcher takes longer than the age of the universe on this (one request froze the
    gateway for every tenant): the linear one answers at once."""
    name = "a" * 128
    assert not like("%" * 1000 + "b")(name)
    assert like("%a" * 128 + "%")(name) and not like("%a" * 129 + "%")(name)
    assert like("%_%" * 300)(name) is False and like("_%" * 100)(name)


def test_a_pattern_over_the_limit_is_refused():
    with pytest.raises(pa.ArrowInvalid, match="over the limit"):
        like("%" * (MAX_PATTERN_CHARS + 1))


def test_a_query_too_nested_for_the_checks_is_refused_not_raised(engine):
    built, _ = engine
    joins = "SELECT 1 FROM t " + " ".join(f"JOIN t t{i} ON t{i}.id = t.id" for i in range(1500))
    with pytest.raises(SqlError) as refused:
        built.check(joins)
    assert refused.value.code == "invalid_request" and "nested too deeply" in str(refused.value)


def test_the_engine_binds_values_as_parameters_and_counts_its_placeholders(engine):
    built, _ = engine
    values = [params.from_python(10), params.from_python("x' OR '1'='1")]
    query = built.start("SELECT id FROM t WHERE id < ? AND CAST(v AS VARCHAR) <> $2", params=values)
    assert query.read().num_rows == 10  # the quote is a value: spliced, it would have changed the query
    schema, parameters = built.prepare("SELECT id, ? AS x FROM t WHERE id < ?")
    assert schema.names == ["id", "x"] and parameters.names == ["parameter_1", "parameter_2"]
    assert built.schema("SELECT id FROM t WHERE id < ?").names == ["id"]  # described before its values
    with pytest.raises(SqlError, match="named parameters"):
        built.start("SELECT id FROM t WHERE id < $limit", params=values[:1])
    with pytest.raises(SqlError, match="2 parameter placeholders and 0 values"):
        built.start("SELECT id FROM t WHERE id < ? AND id > ?")
