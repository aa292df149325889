"""What a client's query may contain, by allow-list: a SELECT over the connector's exposed datasets, built from
the node types, functions and types named here. What is not named is refused, whatever it is — a function that
runs SQL text, reads a file, a setting or the catalogue; a table function; a cast to a catalogue type; a
relation that is not an exposed dataset — so the lists only ever need to grow for what analysts use, never to
chase what an attacker found.

Two trees are walked, each from its engine's own parser:

- DuckDB's (`json_serialize_sql`) at the connector, for queries over its Parquet datasets (`check_duckdb`);
- sqlglot's, for queries pushed into a customer's database (`check_pushdown`, before poc.sources rewrites
  each dataset's name into its own definition, which is the only SQL that touches real tables).

A refusal is an SqlError: `forbidden` for what is not on a list, `not_found` for a relation that is not a
dataset, `invalid_request` for what the parser cannot read.
"""

from __future__ import annotations

import json

from .errors import SqlError

AGGREGATES = {
    "count", "count_star", "sum", "avg", "mean", "min", "max", "median", "mode", "quantile", "quantile_cont",
    "quantile_disc", "approx_quantile", "approx_count_distinct", "stddev", "stddev_pop", "stddev_samp", "var_pop",
    "var_samp", "variance", "first", "last", "any_value", "arg_min", "arg_max", "argmin", "argmax", "min_by",
    "max_by", "bool_and", "bool_or", "every", "string_agg", "group_concat", "list", "array_agg", "corr",
    "covar_pop", "covar_samp", "regr_slope", "regr_intercept", "regr_r2", "regr_count", "product", "bit_and",
    "bit_or", "bit_xor", "count_if", "countif", "entropy", "kurtosis", "skewness", "fsum", "sumkahan", "favg",
    "geomean", "geometric_mean",
}
WINDOW_FUNCTIONS = {"row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead",
                    "first_value", "last_value", "nth_value"}
SCALARS = {
    # arithmetic, comparison and string operators as DuckDB's tree names them
    "+", "-", "*", "/", "//", "%", "^", "**", "&", "|", "<<", ">>", "~", "||", "~~", "!~~", "~~*", "!~~*", "~~~",
    "!~~~", "regexp_full_match",
    # numbers
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "sign", "sqrt", "cbrt", "exp", "ln", "log", "log2",
    "log10", "pow", "power", "mod", "greatest", "least", "pi", "degrees", "radians", "sin", "cos", "tan", "asin",
    "acos", "atan", "atan2", "isnan", "isinf", "isfinite", "even", "gcd", "lcm", "random", "bit_count",
    # text
    "lower", "upper", "lcase", "ucase", "length", "len", "char_length", "character_length", "strlen",
    "octet_length", "substring", "substr", "trim", "ltrim", "rtrim", "concat", "concat_ws", "replace", "left",
    "right", "reverse", "repeat", "lpad", "rpad", "strpos", "position", "instr", "contains", "starts_with",
    "ends_with", "prefix", "suffix", "split_part", "string_split", "str_split", "regexp_matches",
    "regexp_replace", "regexp_extract", "md5", "sha256", "hash", "format", "printf", "ascii", "chr", "unicode",
    "translate", "levenshtein", "jaro_winkler_similarity", "like_escape", "ilike_escape", "initcap",
    # dates and times
    "date_trunc", "datetrunc", "date_part", "datepart", "date_diff", "datediff", "date_sub", "datesub",
    "date_add", "make_date", "make_time", "make_timestamp", "year", "month", "day", "hour", "minute", "second",
    "millisecond", "microsecond", "week", "weekofyear", "dayofweek", "dayofyear", "dayofmonth", "isodow",
    "isoyear", "quarter", "yearweek", "epoch", "epoch_ms", "epoch_us", "epoch_ns", "to_timestamp", "to_days",
    "to_hours", "to_minutes", "to_seconds", "to_months", "to_years", "to_weeks", "to_milliseconds",
    "to_microseconds", "strftime", "strptime", "try_strptime", "now", "current_date", "current_timestamp",
    "get_current_timestamp", "today", "age", "last_day", "monthname", "dayname", "time_bucket", "era",
    "century", "decade", "millennium",
    # conditionals, lists and structs
    "nullif", "ifnull", "if", "iif", "list_value", "struct_pack", "row", "list_extract", "array_extract",
    "list_element", "array_length", "list_contains", "array_contains", "list_has", "list_slice",
    "array_slice", "struct_extract", "list_sort", "list_distinct", "list_unique", "cardinality", "unnest",
}
TABLE_FUNCTIONS = {"range", "generate_series", "unnest"}  # rows made of numbers or a list, never of storage
TYPES = {
    "BOOLEAN", "BOOL", "TINYINT", "SMALLINT", "INTEGER", "INT", "INT2", "INT4", "INT8", "BIGINT", "HUGEINT",
    "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "FLOAT4", "FLOAT8", "REAL", "DOUBLE",
    "DECIMAL", "NUMERIC", "VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR", "BLOB", "BYTEA", "DATE", "TIME",
    "TIMESTAMP", "DATETIME", "TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ", "TIMESTAMP_S", "TIMESTAMP_MS",
    "TIMESTAMP_NS", "INTERVAL", "UUID", "LIST", "STRUCT",
}
# DuckDB's tree: query nodes, table references, modifiers and orderings that may appear
NODE_TYPES = {
    "SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE",
    "BASE_TABLE", "JOIN", "SUBQUERY", "EMPTY", "EXPRESSION_LIST", "TABLE_FUNCTION",
    "ORDER_MODIFIER", "LIMIT_MODIFIER", "DISTINCT_MODIFIER", "LIMIT_PERCENT_MODIFIER",
    "ASCENDING", "DESCENDING", "ORDER_DEFAULT", "INVALID",
}
EXPRESSION_CLASSES = {"BETWEEN", "CASE", "CAST", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "CONSTANT", "FUNCTION",
                      "OPERATOR", "STAR", "SUBQUERY", "WINDOW", "TYPE", "POSITIONAL_REFERENCE",
                      "PARAMETER"}  # a bound value's place: the value is bound, never spliced
OPERATORS = {"COMPARE_IN", "COMPARE_NOT_IN", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "OPERATOR_NOT",
             "OPERATOR_COALESCE", "OPERATOR_NULLIF", "ARRAY_EXTRACT", "ARRAY_SLICE", "STRUCT_EXTRACT",
             "OPERATOR_TRY"}
CATALOG, DB_SCHEMA = "connector", "main"  # the names clients may qualify datasets with (poc.sql.engine)


def _refuse(what: str) -> SqlError:
    return SqlError("forbidden", f"{what} is not allowed: queries read the connector's datasets with the "
                                 "functions and types docs/security.md lists")


MAX_NODES = 20_000  # nodes of a query's tree: far beyond what analysts write, a bound on the time checks take
MAX_RELATIONS = 256  # datasets and CTEs a query names


def check_duckdb(tree_json: str, datasets: set[str]) -> None:
    """Walk DuckDB's serialized tree of one SELECT (`json_serialize_sql`); SqlError on the first thing that is
    not on the lists or names no dataset."""
    try:
        tree = json.loads(tree_json)
    except RecursionError:
        raise SqlError("invalid_request", "the query is nested too deeply") from None
    if tree.get("error"):
        raise SqlError("invalid_request", f"only SELECT queries are allowed: {tree.get('error_message', '')}")
    try:
        for statement in tree["statements"]:
            _DuckWalk(datasets).visit(statement["node"], frozenset())
    except RecursionError:
        raise SqlError("invalid_request", "the query is nested too deeply") from None


class _DuckWalk:
    """DuckDB binds names case-insensitively, so they are compared in lower case; a CTE is in scope in the body
    of the query that defines it and in the CTEs defined after it (a CTE's own body sees only the earlier
    ones, as DuckDB binds it: a later one's name there is a table's)."""

    def __init__(self, datasets: set[str]) -> None:
        self.datasets = {name.lower(): name for name in datasets}

    def visit(self, node, ctes: frozenset) -> None:
        if isinstance(node, list):
            for item in node:
                self.visit(item, ctes)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("class")
        if isinstance(kind, str):
            self._expression(node, kind)
        elif isinstance(node.get("type"), str):
            self._node(node, node["type"], ctes)
            if node["type"] == "RECURSIVE_CTE_NODE":
                ctes = ctes | {str(node.get("cte_name", "")).lower()}
        for key, value in node.items():
            if key == "cte_map" and isinstance(value, dict):
                ctes = self._ctes(value, ctes)
                continue
            if key == "function" and node.get("type") == "TABLE_FUNCTION":
                value = value.get("arguments") if isinstance(value, dict) else None  # its name is checked above
            if isinstance(value, (dict, list)):
                self.visit(value, ctes)

    def _ctes(self, cte_map: dict, ctes: frozenset) -> frozenset:
        """Walk each CTE's body with the CTEs before it in scope; return the scope of the query's body."""
        for entry in cte_map.get("map", []):
            if not isinstance(entry, dict):
                raise _refuse("a malformed WITH")
            self.visit(entry.get("value"), ctes)
            ctes = ctes | {str(entry.get("key", "")).lower()}
        return ctes

    def _node(self, node: dict, kind: str, ctes: frozenset) -> None:
        """Check a query node or table reference."""
        if kind not in NODE_TYPES:
            raise _refuse(kind.lower().replace("_", " "))
        if kind == "BASE_TABLE":
            self._table(node, ctes)
        elif kind == "TABLE_FUNCTION":
            name = str(node.get("function", {}).get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS:
                raise _refuse(f"table function {name}")

    def _table(self, node: dict, ctes: frozenset) -> None:
        name = str(node.get("table_name", "")).lower()
        schema, catalog = (node.get("schema_name") or "").lower(), (node.get("catalog_name") or "").lower()
        if node.get("at_clause") is not None:
            raise _refuse("AT (a table's version)")
        if not schema and not catalog and name in ctes:
            return
        if name not in self.datasets or schema not in ("", DB_SCHEMA) or catalog not in ("", CATALOG):
            shown = ".".join(part for part in (catalog, schema, name) if part)
            raise SqlError("not_found", f"no dataset {shown[:200]!r}: a query reads the connector's datasets "
                                        f"({', '.join(sorted(self.datasets.values()))})")

    def _expression(self, node: dict, kind: str) -> None:
        if kind not in EXPRESSION_CLASSES:
            raise _refuse(kind.lower().replace("_", " "))
        if kind in ("FUNCTION", "WINDOW"):
            name = str(node.get("function_name", "")).lower()
            allowed = SCALARS | AGGREGATES if kind == "FUNCTION" else WINDOW_FUNCTIONS | AGGREGATES
            if name not in allowed or node.get("schema") or node.get("catalog") or node.get("export_state"):
                raise _refuse(f"function {name[:100]}")
        elif kind == "OPERATOR" and node.get("type") not in OPERATORS:
            raise _refuse(str(node.get("type", "")).lower().replace("_", " "))
        elif kind == "TYPE":
            name = str(node.get("type_name", "")).upper()
            if name not in TYPES or node.get("schema") or node.get("catalog"):
                raise _refuse(f"type {name[:100]}")


# -- sqlglot, for queries pushed into a database


def check_pushdown(tree, datasets: set[str], dialect: str) -> None:
    """Walk sqlglot's tree of one query for a database: every node of an allowed type, every function on the
    lists, every cast to an allowed type, every relation an exposed dataset or a CTE in scope."""
    from sqlglot import exp

    allowed = _sqlglot_nodes()
    nodes = list(tree.walk())
    if len(nodes) > MAX_NODES:
        raise SqlError("invalid_request", f"the query has over {MAX_NODES} parts: too large to check")
    if sum(isinstance(node, (exp.Table, exp.CTE)) for node in nodes) > MAX_RELATIONS:
        raise SqlError("invalid_request", f"a query may name at most {MAX_RELATIONS} relations and CTEs")
    for node in nodes:
        if isinstance(node, exp.Anonymous):
            name = node.name.lower()
            if name not in SCALARS | AGGREGATES | WINDOW_FUNCTIONS:
                raise _refuse(f"function {name[:100]}")
        elif isinstance(node, exp.DataType):
            kind = node.this.name if isinstance(node.this, exp.DataType.Type) else str(node.this)
            if kind.upper() not in SQLGLOT_TYPES:
                raise _refuse(f"type {node.sql(dialect)[:100]}")
        elif not isinstance(node, allowed):
            raise _refuse(_described(node))
        if isinstance(node, exp.Table):
            if not isinstance(node.this, exp.Identifier):
                raise _refuse("a table function")
            if is_cte_reference(node):
                continue
            if node.db or node.catalog or node.name not in datasets:
                raise SqlError("not_found", f"no dataset {node.sql(dialect)[:200]!r}: a query names the connector's "
                                            f"datasets ({', '.join(sorted(datasets))})")


def is_cte_reference(table) -> bool:
    """Whether a relation of sqlglot's tree names a CTE in scope where it stands: one of the WITH of a query
    around it, or, inside a CTE's body, one defined before it (all of them in a WITH RECURSIVE). Names are
    compared after the dialect's identifier folding (`normalize_identifiers`), as the database compares them:
    a name that only looks like a CTE's is a table's, and is checked as one."""
    from sqlglot import exp

    if table.db or table.catalog:
        return False
    node = table
    while node.parent is not None:
        parent = node.parent
        if isinstance(parent, exp.With):
            ctes = list(parent.expressions)
            visible = ctes if parent.args.get("recursive") else ctes[:ctes.index(node)] if node in ctes else ctes
            if table.name in {cte.alias_or_name for cte in visible}:
                return True
            node = parent.parent  # the query this WITH belongs to: its CTEs are done
            if node is None:
                return False
        elif isinstance(parent, exp.Query) and _with_of(parent) is not None:
            if table.name in {cte.alias_or_name for cte in _with_of(parent).expressions}:
                return True
            node = parent
        else:
            node = parent
    return False


def _with_of(query):
    """A query's WITH (sqlglot names the argument `with_` since version 28, `with` before)."""
    return query.args.get("with_", query.args.get("with"))


def _described(node) -> str:
    from sqlglot import exp

    if isinstance(node, exp.Func):
        return f"function {node.sql_name().lower()}"
    return node.key.replace("_", " ")


SQLGLOT_TYPES = {"BOOLEAN", "TINYINT", "SMALLINT", "INT", "BIGINT", "FLOAT", "DOUBLE", "DECIMAL", "VARCHAR",
                 "NVARCHAR", "CHAR", "NCHAR", "TEXT", "DATE", "TIME", "TIMETZ", "TIMESTAMP", "TIMESTAMPTZ",
                 "TIMESTAMPLTZ", "INTERVAL", "UUID", "VARBINARY", "BINARY", "BIGDECIMAL", "DOUBLE PRECISION"}


def _sqlglot_nodes() -> tuple[type, ...]:
    """sqlglot's node classes a query may contain: structure, operators and the functions analysts use."""
    from sqlglot import exp

    names = [
        # structure
        "Select", "Union", "Intersect", "Except", "Subquery", "With", "CTE", "TableAlias", "Table", "Join", "From",
        "Where", "Group", "Having", "Order", "Ordered", "Limit", "Offset", "Distinct", "Column", "Identifier",
        "Star", "Literal", "Null", "Boolean", "Alias", "Paren", "Tuple", "Values", "Var", "Window", "WindowSpec",
        "Filter", "Qualify", "Exists", "Any", "All", "Bracket", "Interval", "Cast", "TryCast", "DataType",
        "DataTypeParam", "Case", "If", "Coalesce", "Nullif", "Lateral", "Unnest",
        "Placeholder", "Parameter",  # a bound value's place (poc.sources.pushdown.placeholders)
        # operators
        "EQ", "NEQ", "GT", "GTE", "LT", "LTE", "NullSafeEQ", "NullSafeNEQ", "And", "Or", "Not", "Xor", "Add", "Sub",
        "Mul", "Div", "IntDiv", "Mod", "Neg", "Pow", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
        "BitwiseLeftShift", "BitwiseRightShift", "Like", "ILike", "Is", "In", "Between", "DPipe", "Escape",
        "SimilarTo", "RegexpLike", "RegexpILike",
        # aggregates and windows
        "Count", "Sum", "Avg", "Min", "Max", "Stddev", "StddevPop", "StddevSamp", "Variance", "VariancePop",
        "Median", "Quantile", "PercentileCont", "PercentileDisc", "ApproxDistinct", "ArrayAgg", "GroupConcat",
        "StringAgg", "First", "Last", "AnyValue", "ArgMax", "ArgMin", "LogicalAnd", "LogicalOr", "Corr",
        "CovarPop", "CovarSamp", "CountIf", "RowNumber", "Rank", "DenseRank", "PercentRank", "CumeDist", "Ntile",
        "Lag", "Lead", "FirstValue", "LastValue", "NthValue", "WithinGroup", "IgnoreNulls", "RespectNulls",
        # scalars
        "Abs", "Ceil", "Floor", "Round", "Sign", "Sqrt", "Cbrt", "Exp", "Ln", "Log", "Log2", "Log10", "Greatest",
        "Least", "Pi", "Lower", "Upper", "Length", "ByteLength", "Substring", "Trim", "Concat", "ConcatWs",
        "Replace", "Left", "Right", "Reverse", "Repeat", "Pad", "StrPosition", "Contains", "StartsWith",
        "EndsWith", "SplitPart", "RegexpReplace", "RegexpExtract", "MD5", "SHA2", "Initcap", "Ascii", "Chr",
        "Unicode", "Translate", "Levenshtein", "DateTrunc", "TimestampTrunc", "Extract", "DateAdd", "DateSub",
        "DateDiff", "TimestampAdd", "TimestampSub", "TimestampDiff", "CurrentDate", "CurrentTimestamp",
        "CurrentTime", "Year", "Month", "Day", "Quarter", "Week", "DayOfWeek", "DayOfMonth", "DayOfYear",
        "TimeToStr", "StrToTime", "StrToDate", "UnixToTime", "TimeToUnix", "ToChar", "Date", "DateFromParts",
        "TimeFromParts", "Age", "LastDay", "Anonymous", "Array", "ArrayContains", "ArraySize", "Struct",
    ]
    return tuple(getattr(exp, name) for name in names if hasattr(exp, name))
