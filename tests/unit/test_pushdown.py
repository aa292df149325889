"""SQL pushed into a database, checked and rewritten without one: the allow-list decides, and each dataset's name
becomes its own definition. (tests/integration/test_sources.py runs the same attacks against a real PostgreSQL.)"""

from __future__ import annotations

import re

import pytest

from poc.sources.database import DatabaseSource, PostgreSQL
from poc.sources.pushdown import pushdown
from poc.sql.errors import SqlError

DB = PostgreSQL("postgresql://reader@127.0.0.1:5432/shop", None)
TABLES = {"recent": DatabaseSource("recent", DB, query="SELECT id, amount FROM sales WHERE id < 1000"),
          "sales": DatabaseSource("sales", DB, table="public.sales")}


@pytest.mark.parametrize("sql, rewritten", [
    ("SELECT id FROM sales WHERE id % 100 = 7", "SELECT id FROM (SELECT * FROM public.sales) AS sales WHERE id % 100 = 7"),
    ("SELECT count(*) AS n FROM sales s JOIN recent r ON s.id = r.id",
     "FROM (SELECT * FROM public.sales) AS s JOIN (SELECT id, amount FROM sales WHERE id < 1000) AS r"),
    ("WITH x AS (SELECT id FROM recent) SELECT * FROM x", "WITH x AS (SELECT id FROM (SELECT id, amount FROM sales"),
    ('WITH "X" AS (SELECT id FROM recent) SELECT * FROM "X"', 'SELECT * FROM "X"'),
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t, recent",
     "SELECT n + 1 FROM t WHERE n < 3"),
    ("SELECT date_trunc('day', now()), CAST(id AS TEXT), coalesce(amount, 0) FROM recent", "CAST(id AS TEXT)"),
])
def test_a_select_over_exposed_datasets_is_rewritten_to_their_definitions(sql, rewritten):
    database, text, placeholders = pushdown(sql, TABLES, set())
    assert database is DB and placeholders == 0 and rewritten in text
    assert "FROM sales" not in text.replace("FROM sales WHERE id < 1000", "")  # only the definitions read tables


@pytest.mark.parametrize("sql, code, reason", [
    ("SELECT query_to_xml('select 1', true, false, '') FROM recent", "forbidden", "query_to_xml"),
    ("SELECT database_to_xml(true, false, '') FROM recent", "forbidden", "database_to_xml"),
    ("SELECT 'cards'::regclass FROM recent", "forbidden", "REGCLASS"),
    ("SELECT 1::oid FROM recent", "forbidden", "OID"),
    ("SELECT current_setting('data_directory') FROM recent", "forbidden", "current_setting"),
    ("SELECT current_user FROM recent", "forbidden", "current_user"),
    ("SELECT * FROM recent, pg_catalog.pg_class", "not_found", "pg_catalog.pg_class"),
    ("SELECT * FROM recent WHERE id IN (SELECT id FROM cards)", "not_found", "cards"),
    ("SELECT * FROM cards, (WITH cards AS (SELECT 1) SELECT 1 FROM recent) x", "not_found", "cards"),
    ("WITH a AS (SELECT * FROM cards), cards AS (SELECT 1) SELECT * FROM a, recent", "not_found", "cards"),
    ('WITH X AS (SELECT id FROM recent) SELECT * FROM "X"', "not_found", '"X"'),  # X folds to x; "X" is a table
    ("SELECT * FROM generate_series(1, 3), recent", "forbidden", "table function"),
    ("SELECT * FROM sales FOR UPDATE", "invalid_request", "only SELECT"),
    ("SELECT 1 FROM sales; DELETE FROM sales", "invalid_request", "one statement"),
    ("SELECT " + "+".join(["id"] * 12_000) + " FROM sales", "invalid_request", "too large to check"),
    ("SELECT 1 FROM sales " + " ".join(f"JOIN sales s{i} ON s{i}.id = sales.id" for i in range(300)),
     "invalid_request", "at most 256 relations"),
], ids=lambda value: str(value)[:30])
def test_what_is_not_on_the_lists_is_refused_before_any_database(sql, code, reason):
    with pytest.raises(SqlError) as refused:
        pushdown(sql, TABLES, set())
    assert refused.value.code == code and reason in str(refused.value), str(refused.value)


@pytest.mark.parametrize("sql, rewritten, count", [
    ("SELECT id FROM sales WHERE id < ? AND amount > ?", "WHERE id < $1 AND amount > $2", 2),
    ("SELECT id FROM sales WHERE id < $2 AND amount > $1", "WHERE id < $2 AND amount > $1", 2),
    ("SELECT id FROM sales WHERE value = '?' AND id < ? -- ?\n", "WHERE value = '?' AND id < $1", 1),
    ("SELECT id FROM sales OFFSET ? LIMIT ?", "LIMIT $2 OFFSET $1", 2),  # sqlglot reorders: the values follow
])
def test_placeholders_are_numbered_in_the_order_they_stand(sql, rewritten, count):
    _, text, placeholders = pushdown(sql, TABLES, set())
    assert rewritten in text
    assert placeholders == count


@pytest.mark.parametrize("sql, error", [
    ("SELECT id FROM sales WHERE id < $2", "from $1 without gaps"),
    ("SELECT id FROM sales WHERE id < :name", "as ? or $1"),
    ("SELECT id FROM sales WHERE id < $name", "as ? or $1"),
])
def test_placeholders_other_than_numbered_ones_are_refused(sql, error):
    with pytest.raises(SqlError, match=re.escape(error)):
        pushdown(sql, TABLES, set())
