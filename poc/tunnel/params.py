"""Bound parameters of a query (docs/protocol.md §3d, 1.7): typed values in JSON, the one form the tunnel, the
Flight SQL handles and both engines read them in. Pure Python: the Arrow side is poc.sql.params.

    [{"type": "int", "value": 10}, {"type": "string", "value": "EU"}, {"type": "null"}]

Types, by allow-list: null, bool, int (within int64), float (finite), string, binary (base64), date
(`YYYY-MM-DD`), timestamp (ISO 8601, with or without an offset). At most MAX_PARAMS values, whose texts and
bytes total at most MAX_PARAM_BYTES.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math

MAX_PARAMS = 64  # values bound to one query
MAX_PARAM_BYTES = 64 * 1024  # their strings and binaries together (UTF-8 / decoded bytes)
TYPES = ("null", "bool", "int", "float", "string", "binary", "date", "timestamp")
INT64 = (-2**63, 2**63 - 1)


class ParamError(ValueError):
    """Values that are not parameters of §3d: the message says which and why."""


def _size(kind: str, value) -> int:
    if kind == "string":
        return len(value.encode("utf-8"))
    if kind == "binary":
        return len(value) * 3 // 4
    return 0


def check(values: object) -> list[dict]:
    """`values` if they are parameters of §3d (each checked as to_python reads it); ParamError otherwise."""
    if not isinstance(values, list):
        raise ParamError("params must be a list")
    if len(values) > MAX_PARAMS:
        raise ParamError(f"{len(values)} parameters, over the limit of {MAX_PARAMS}")
    total = 0
    for i, item in enumerate(values, 1):
        if not isinstance(item, dict) or set(item) - {"type", "value"} or item.get("type") not in TYPES:
            raise ParamError(f"parameter {i} must be {{\"type\": one of {', '.join(TYPES)}, \"value\": …}}")
        _value(item, i)
        total += _size(item["type"], item.get("value"))
        if total > MAX_PARAM_BYTES:
            raise ParamError(f"parameters over {MAX_PARAM_BYTES} bytes of text and binary")
    return values


def to_python(values: list[dict]) -> list:
    """The Python values for an engine's driver (DuckDB, ADBC), in order."""
    return [_value(item, i) for i, item in enumerate(values, 1)]


def _value(item: dict, i: int):
    kind, value = item["type"], item.get("value")
    if kind == "null":
        if value is not None:
            raise ParamError(f"parameter {i}: a null has no value")
        return None
    try:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool) and \
                INT64[0] <= value <= INT64[1]:
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            return float(value)
        if kind == "string" and isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate is not text
            return value
        if kind == "binary" and isinstance(value, str):
            return base64.b64decode(value, validate=True)
        if kind == "date" and isinstance(value, str) and len(value) == 10:
            return dt.date.fromisoformat(value)
        if kind == "timestamp" and isinstance(value, str) and len(value) <= 40:
            return dt.datetime.fromisoformat(value)
    except (ValueError, UnicodeEncodeError, binascii.Error):
        pass
    raise ParamError(f"parameter {i}: {str(value)[:60]!r} is not of type {kind}"
                     + {"int": " within int64", "float": " (finite)", "binary": " (base64)",
                        "date": " (YYYY-MM-DD)", "timestamp": " (ISO 8601)"}.get(kind, ""))


def from_python(value) -> dict:
    """One parameter from a Python value (the direct server's and tests' way in)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "binary", "value": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"type": "timestamp", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {"type": "date", "value": value.isoformat()}
    raise ParamError(f"a {type(value).__name__} cannot be a parameter (types: {', '.join(TYPES)})")
