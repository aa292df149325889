"""What the gateway checks of the Arrow a connector sends before a client sees it (docs/security.md): schemas read
and refused when Arrow cannot read them or they carry dictionaries, and the schema batches are validated with."""

from __future__ import annotations

import pyarrow as pa

from ..errors import Internal

DECODE_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, pa.ArrowIndexError, OSError,
                 ValueError)


def read_schema(payload, tenant_id: str) -> pa.Schema:
    """A connector's schema message, refused when Arrow cannot read it or it has dictionary fields (§4a)."""
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(payload))
    except DECODE_ERRORS as exc:
        raise Internal(f"connector of tenant {tenant_id} sent an invalid schema: "
                                         f"{str(exc)[:300]}") from None
    if any(_has_dictionary(f.type) for f in schema):
        raise Internal(f"connector of tenant {tenant_id} sent a schema with dictionary-encoded "
                                         "fields, which protocol version 1 does not carry")
    return schema


def _has_dictionary(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) or any(_has_dictionary(t.field(i).type) for i in range(t.num_fields))


def bounds_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with every string type read as its binary twin (same layout): validating a batch read
    with it checks every buffer and offset against its bounds but not UTF-8, which costs six times more
    (docs/results.md) and guards no memory. Types it does not know are kept, and so fully validated."""
    return pa.schema([_binary_field(f) for f in schema], metadata=schema.metadata)


def _binary_field(f: pa.Field) -> pa.Field:
    return pa.field(f.name, _binary_twin(f.type), f.nullable, f.metadata)


def _binary_twin(t: pa.DataType) -> pa.DataType:
    twins = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}
    if t in twins:
        return twins[t]
    if pa.types.is_struct(t):
        return pa.struct([_binary_field(t.field(i)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_binary_field(t.key_field), _binary_field(t.item_field), t.keys_sorted)
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_binary_field(t.value_field), t.list_size)
    for is_kind, make in ((pa.types.is_list, pa.list_), (pa.types.is_large_list, pa.large_list),
                          (pa.types.is_list_view, pa.list_view), (pa.types.is_large_list_view, pa.large_list_view)):
        if is_kind(t):
            return make(_binary_field(t.value_field))
    return t  # unions, run-end encoded, extensions: validated with their own types, UTF-8 included
