"""SQL pushed into the database its datasets live in: parsed with sqlglot, checked against the allow-list of
poc.sql.allowed, and rewritten so that each dataset's name reads its own definition as a subquery."""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from ..sql.allowed import check_pushdown, is_cte_reference
from ..sql.errors import SqlError
from .database import Database, DatabaseQuery, DatabaseSource, bound_values


def involves(sql: str, tables: dict[str, DatabaseSource]) -> bool:
    """Whether a query names any database dataset (it then runs in that database, not in DuckDB)."""
    try:
        trees = sqlglot.parse(sql)
    except sqlglot.errors.ParseError:
        return False  # DuckDB's parser gives the client its own message
    return any(t.name in tables for tree in trees if tree is not None for t in tree.find_all(exp.Table))


def number_placeholders(sql: str, dialect: str) -> str:
    """`sql` with each `?` placeholder written as PostgreSQL's `$1`, `$2`… in the order they stand in the text
    (strings and comments left alone), so that rewriting the query cannot reorder the values (sqlglot writes
    `OFFSET ? LIMIT ?` as `LIMIT … OFFSET …`)."""
    from sqlglot.tokens import TokenType

    try:
        tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(sql)
    except sqlglot.errors.SqlglotError as exc:
        raise SqlError("invalid_request", f"syntax error: {str(exc)[:500]}") from None
    marks = [t for t in tokens if t.token_type == TokenType.PLACEHOLDER and t.text == "?"]
    out, last = [], 0
    for number, token in enumerate(marks, 1):
        out += [sql[last:token.start], f"${number}"]
        last = token.end + 1
    return "".join(out) + sql[last:]


def placeholders(tree, dialect: str) -> int:
    """How many values a pushed query takes: its `$1`…`$n` (all of them, no gaps); SqlError for other
    placeholders, or any where the database's driver cannot keep their order (SQLite's `?`)."""
    numbers = set()
    for node in tree.find_all(exp.Placeholder, exp.Parameter):
        literal = node.this if isinstance(node, exp.Parameter) else None
        if dialect != "postgres" or not isinstance(literal, exp.Literal) or literal.is_string:
            raise SqlError("invalid_request", "parameters reach a database's datasets as ? or $1, $2, … and only "
                                              "in PostgreSQL; put the values in the query for this one")
        numbers.add(int(literal.this))
    if numbers != set(range(1, len(numbers) + 1)):
        raise SqlError("invalid_request", f"parameters ${', $'.join(map(str, sorted(numbers)))}: number them "
                                          "from $1 without gaps")
    return len(numbers)


def pushdown(sql: str, tables: dict[str, DatabaseSource], files: set[str]) -> tuple[Database, str, int]:
    """A client's query for the database its datasets live in: one SELECT over exposed datasets of one
    database only, holding nothing but what poc.sql.allowed lists (node types, functions, types), and
    rewritten so that each dataset's name reads its own definition as a subquery — `(SELECT * FROM <table>)`
    or `(<query>)` — the only SQL that touches real tables (so no system column or catalogue is in reach
    either); and how many parameter values it takes (PostgreSQL's `$n`; `?` are numbered so). Raises SqlError
    with the reason."""
    try:
        named = {t.name for tree in sqlglot.parse(sql) if tree is not None for t in tree.find_all(exp.Table)}
    except (sqlglot.errors.SqlglotError, RecursionError) as exc:
        raise SqlError("invalid_request", f"syntax error: {str(exc)[:500]}") from None
    databases = {id(tables[n].database): tables[n].database for n in named if n in tables}
    if not databases:
        raise SqlError("not_found", f"the query names none of the connector's datasets ({', '.join(sorted(tables))})")
    if len(databases) != 1:
        raise SqlError("invalid_request", "a query may read the datasets of one database only")
    if named & files:
        raise SqlError("invalid_request", "a query may not join database datasets with Parquet datasets: "
                                          f"{sorted(named & files)} are files")
    database = next(iter(databases.values()))
    if database.DIALECT == "postgres":
        sql = number_placeholders(sql, database.DIALECT)
    try:
        trees = sqlglot.parse(sql, read=database.DIALECT)
    except (sqlglot.errors.SqlglotError, RecursionError) as exc:
        raise SqlError("invalid_request", f"syntax error: {str(exc)[:500]}") from None
    if len(trees) != 1 or trees[0] is None:
        raise SqlError("invalid_request", f"one statement per query, got {len(trees)}")
    tree = trees[0]
    if not isinstance(tree, exp.Query) or tree.find(exp.Into) or tree.find(exp.Lock):
        raise SqlError("invalid_request", "only SELECT queries are allowed (no INTO, no FOR UPDATE)")
    mine = {name for name, table in tables.items() if table.database is database}
    try:
        tree = normalize_identifiers(tree, dialect=database.DIALECT)  # names as the database compares them
        check_pushdown(tree, mine, database.DIALECT)
        count = placeholders(tree, database.DIALECT)
    except RecursionError:
        raise SqlError("invalid_request", "the query is nested too deeply") from None
    definitions: dict[str, exp.Expression] = {}  # each dataset's definition, parsed once
    for table in list(tree.find_all(exp.Table)):
        if is_cte_reference(table):
            continue
        dataset, alias = tables[table.name], table.alias or table.name
        if dataset.name not in definitions:
            definitions[dataset.name] = (exp.select("*").from_(exp.to_table(dataset.table, dialect=database.DIALECT))
                                         if dataset.table else sqlglot.parse_one(dataset.query, read=database.DIALECT))
        table.replace(exp.Subquery(this=definitions[dataset.name].copy(),
                                   alias=exp.TableAlias(this=exp.to_identifier(alias))))
    return database, tree.sql(dialect=database.DIALECT), count


def route(sql: str, sources: dict) -> tuple[Database, str, int] | None:
    """Where a client's query runs: (its database, the query rewritten for it, its placeholders) when it names
    datasets held in a database (`pushdown`), else None: DuckDB runs it over the held datasets. The connector and
    the direct server route the same way."""
    in_databases = {n: s for n, s in sources.items() if s.database is not None}
    if not in_databases or not involves(sql, in_databases):
        return None
    return pushdown(sql, in_databases, {n for n, s in sources.items() if s.database is None})


def pushed_query(pushed: tuple[Database, str, int], timeout_s: float | None, params: list | None) -> DatabaseQuery:
    """A routed query (`route`) as the statement its database runs, `params` bound by its driver; not started."""
    database, sql, placeholders = pushed
    return DatabaseQuery(database, sql, timeout_s, bound_values(placeholders, params))
