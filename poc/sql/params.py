"""Bound parameters on the Arrow side: a Flight SQL client's parameter batch read into the typed values of
poc.tunnel.params (by allow-list of Arrow types, bounded), the parameter schema a prepared statement
announces, and the values as an Arrow batch for an ADBC driver."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from ..tunnel import params as bound
from ..tunnel.params import MAX_PARAMS, ParamError
from .errors import SqlError

_KINDS = (  # Arrow type test → the typed value's type
    (pa.types.is_null, "null"), (pa.types.is_boolean, "bool"), (pa.types.is_integer, "int"),
    (pa.types.is_floating, "float"), (pa.types.is_string, "string"), (pa.types.is_large_string, "string"),
    (pa.types.is_binary, "binary"), (pa.types.is_large_binary, "binary"), (pa.types.is_date, "date"),
    (pa.types.is_timestamp, "timestamp"))


def counted(placeholders: int, params: list | None) -> list:
    """The values bound to a query (poc.tunnel.params), if there are as many as its placeholders; SqlError
    otherwise."""
    if len(params or ()) != placeholders:
        raise SqlError("invalid_request", f"the query has {placeholders} parameter placeholders and "
                                          f"{len(params or ())} values were bound")
    return params or []


def parameter_schema(count: int) -> pa.Schema:
    """What a prepared statement's `parameter_schema` announces: one field per placeholder, in order, of type
    null — any value the engine can convert where the placeholder stands (the engines do not say more)."""
    return pa.schema([pa.field(f"parameter_{i}", pa.null()) for i in range(1, count + 1)])


def _kind(field: pa.Field, i: int) -> str:
    kind = next((name for test, name in _KINDS if test(field.type)), None)
    if kind is None:
        raise ParamError(f"parameter {i} ({field.name!r}) is of type {field.type}: parameters may be null, boolean, "
                         "integers, floating point, string, binary, date or timestamp")
    return kind


def from_arrow(table: pa.Table) -> list[dict]:
    """The one row of values a client bound (a DoPut's batches, read whole), as typed values; ParamError when
    it is not exactly one row or holds a type or a size the allow-list does not take."""
    if table.num_columns > MAX_PARAMS:
        raise ParamError(f"{table.num_columns} parameters, over the limit of {MAX_PARAMS}")
    if table.num_rows != 1:
        raise ParamError(f"{table.num_rows} rows of parameters: a query takes one row of values (several rows, as "
                         "executemany sends, would run it once per row: this read-only service runs one)")
    values = []
    for i, (field, column) in enumerate(zip(table.schema, table.columns), 1):
        kind = _kind(field, i)
        if kind == "timestamp" and field.type.unit == "ns":
            try:
                column = column.cast(pa.timestamp("us", field.type.tz))
            except pa.ArrowInvalid:
                raise ParamError(f"parameter {i}: nanoseconds are not kept; round to microseconds") from None
        value = column[0].as_py()
        if kind == "float" and value is not None:
            value = float(value)  # a half float comes as numpy's
        values.append(bound.from_python(value))
    return bound.check(values)


_ARROW_TYPES = {"null": pa.null(), "bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(),
                "string": pa.string(), "binary": pa.binary(), "date": pa.date32()}


def to_arrow(values: list[dict]) -> pa.RecordBatch:
    """The values as a one-row batch of their own types, for an ADBC driver to bind."""
    arrays = []
    for item, value in zip(values, bound.to_python(values)):
        if item["type"] == "timestamp":
            tz = None if value.tzinfo is None else "UTC"
            value = value if tz is None else value.astimezone(dt.timezone.utc)
            arrays.append(pa.array([value], pa.timestamp("us", tz)))
        else:
            arrays.append(pa.array([value], _ARROW_TYPES[item["type"]]))
    return pa.RecordBatch.from_arrays(arrays, names=[f"parameter_{i}" for i in range(1, len(arrays) + 1)])
