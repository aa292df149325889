"""Arrow Flight SQL on a Flight server: the commands ADBC, JDBC and other Flight SQL clients send, answered
from a `SqlBackend` (the gateway's tunnels, or the direct server's own engine).

Served: statements (`CommandStatementQuery` → FlightInfo with a `TicketStatementQuery` → DoGet), prepared
statements (the `CreatePreparedStatement` / `ClosePreparedStatement` actions, `CommandPreparedStatementQuery`,
its parameters bound with DoPut), `CommandGetSqlInfo`, `CommandGetCatalogs`, `CommandGetDbSchemas`,
`CommandGetTables` (with table schemas), `CommandGetTableTypes`, and the key commands (empty: datasets have no
keys). Everything is read-only: updates and ingestion are refused with a clear error.

Statement and prepared-statement handles carry the query itself — and its bound values (poc.tunnel.params) —
so they hold no state on the server: binding parameters answers a new handle (`DoPutPreparedStatementResult`),
closing one frees nothing, any replica can run it, and a handle is worth no more than the query text and
values it carries, read and checked again at every use (the bearer token decides which tenant's data it runs
on).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Protocol

import pyarrow as pa
import pyarrow.flight as flight

from .. import __version__
from ..config import MAX_QUERY_BYTES
from ..flight_actions import Actions
from ..tunnel import params as bound
from . import proto
from .engine import CATALOG, DB_SCHEMA
from .params import from_arrow
from .patterns import like

HANDLE_PREFIX = b"poc-sql/1\n"  # then the query's text
BOUND_PREFIX = b"poc-sql/2\n"  # then {"sql": …, "params": […]} (poc.tunnel.params)
SERVER_NAME = "poc tunnel gateway"


class SqlBackend(Protocol):
    """Where queries run and what tables exist, for the caller `who` (its tenant)."""

    def tables(self, who, with_schemas: bool) -> list[tuple[str, pa.Schema | None]]: ...

    def describe(self, who, sql: str, params: list | None = None) -> pa.Schema:
        """The result's schema; with `params` None, of a query whose placeholders are not bound yet."""

    def prepare(self, who, sql: str) -> tuple[pa.Schema, pa.Schema]:
        """The result's schema and the parameters' (one field per placeholder; empty without any)."""

    def execute(self, who, sql: str, cancelled: Callable[[], bool],
                params: list | None = None) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]: ...


def sql_command(data: bytes) -> proto.Message | None:
    """The Flight SQL message in a descriptor's command, a ticket or an action body; None when the bytes are
    not Flight SQL at all. Bytes that claim to be Flight SQL and are not are refused here, as bad input."""
    if len(data) > proto.MAX_COMMAND_BYTES:
        raise pa.ArrowInvalid(f"Flight SQL command of {len(data)} bytes, over the limit of {proto.MAX_COMMAND_BYTES}")
    try:
        return proto.unpack_any(data)
    except proto.UnknownCommand as exc:
        raise pa.ArrowNotImplementedError(str(exc)) from None
    except proto.ProtoError as exc:
        raise pa.ArrowInvalid(f"invalid Flight SQL command: {exc}") from None


def descriptor_command(descriptor: flight.FlightDescriptor) -> proto.Message | None:
    if descriptor.descriptor_type != flight.DescriptorType.CMD:
        return None
    return sql_command(descriptor.command)


def make_handle(sql: str, params: list | None = None) -> bytes:
    if not params:
        return HANDLE_PREFIX + sql.encode("utf-8")
    return BOUND_PREFIX + json.dumps({"sql": sql, "params": params}, separators=(",", ":")).encode("utf-8")


def statement_of(handle: bytes) -> tuple[str, list | None]:
    """The query a statement or prepared-statement handle carries, and its bound values (None: none bound). A
    handle comes back from a client: its values are checked again, as any client input."""
    try:
        if handle.startswith(HANDLE_PREFIX):
            return handle[len(HANDLE_PREFIX):].decode("utf-8"), None
        if handle.startswith(BOUND_PREFIX):
            body = json.loads(handle[len(BOUND_PREFIX):])
            if isinstance(body, dict) and set(body) == {"sql", "params"} and isinstance(body["sql"], str):
                return body["sql"], bound.check(body["params"])
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass  # bound.ParamError is a ValueError: a tampered handle is one that is not this server's
    raise pa.ArrowInvalid("not a statement handle of this server")


def checked_query(sql: str, max_bytes: int = MAX_QUERY_BYTES) -> str:
    """A query's text within the size limit, refused before it reaches any tunnel."""
    size = len(sql.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise pa.ArrowInvalid(f"query of {size} bytes, over the limit of {max_bytes}")
    if not sql.strip():
        raise pa.ArrowInvalid("empty query")
    return sql


# -- the metadata results' schemas, as FlightSql.proto gives them
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), False)])
DB_SCHEMAS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8(), False)])
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), False)])
_TABLES_FIELDS = [pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
                  pa.field("table_name", pa.utf8(), False), pa.field("table_type", pa.utf8(), False)]
TABLES_SCHEMA = pa.schema(_TABLES_FIELDS)
TABLES_WITH_SCHEMA_SCHEMA = pa.schema([*_TABLES_FIELDS, pa.field("table_schema", pa.binary(), False)])
PRIMARY_KEYS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), False), pa.field("column_name", pa.utf8(), False),
    pa.field("key_name", pa.utf8()), pa.field("key_sequence", pa.int32(), False)])
FOREIGN_KEYS_SCHEMA = pa.schema([
    pa.field("pk_catalog_name", pa.utf8()), pa.field("pk_db_schema_name", pa.utf8()),
    pa.field("pk_table_name", pa.utf8(), False), pa.field("pk_column_name", pa.utf8(), False),
    pa.field("fk_catalog_name", pa.utf8()), pa.field("fk_db_schema_name", pa.utf8()),
    pa.field("fk_table_name", pa.utf8(), False), pa.field("fk_column_name", pa.utf8(), False),
    pa.field("key_sequence", pa.int32(), False), pa.field("fk_key_name", pa.utf8()),
    pa.field("pk_key_name", pa.utf8()), pa.field("update_rule", pa.uint8(), False),
    pa.field("delete_rule", pa.uint8(), False)])
_INFO_VALUE = pa.dense_union([
    pa.field("string_value", pa.utf8()), pa.field("bool_value", pa.bool_()), pa.field("bigint_value", pa.int64()),
    pa.field("int32_bitmask", pa.int32()), pa.field("string_list", pa.list_(pa.utf8())),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32())))])
SQL_INFO_SCHEMA = pa.schema([pa.field("info_name", pa.uint32(), False), pa.field("value", _INFO_VALUE, False)])

# SqlInfo ids → value: FLIGHT_SQL_SERVER_NAME, _VERSION, _ARROW_VERSION, _READ_ONLY, _SQL, _SUBSTRAIT,
# _TRANSACTION (0: none), _CANCEL, SQL_DDL_CATALOG/_SCHEMA/_TABLE, SQL_IDENTIFIER_QUOTE_CHAR,
# SQL_SEARCH_STRING_ESCAPE ("": none), SQL_CATALOG_TERM, SQL_SCHEMA_TERM.
def _sql_info_values() -> dict[int, object]:
    return {0: SERVER_NAME, 1: __version__, 2: pa.__version__, 3: True, 4: True, 5: False, 8: ("int32", 0),
            9: False, 500: False, 501: False, 502: False, 504: '"', 513: "", 529: "schema", 531: "catalog"}


def sql_info_table(ids: tuple[int, ...]) -> pa.Table:
    """One row per requested SqlInfo this server knows (all of them when none is asked), as a dense union."""
    values = _sql_info_values()
    names = [i for i in (ids or sorted(values)) if i in values]
    strings, bools, int32s, type_ids, offsets = [], [], [], [], []
    for name in names:
        value = values[name]
        if isinstance(value, bool):
            type_ids.append(1), offsets.append(len(bools)), bools.append(value)
        elif isinstance(value, tuple):
            type_ids.append(3), offsets.append(len(int32s)), int32s.append(value[1])
        else:
            type_ids.append(0), offsets.append(len(strings)), strings.append(value)
    children = [pa.array(strings, pa.utf8()), pa.array(bools, pa.bool_()), pa.array([], pa.int64()),
                pa.array(int32s, pa.int32()), pa.array([], pa.list_(pa.utf8())),
                pa.array([], pa.map_(pa.int32(), pa.list_(pa.int32())))]
    union = pa.UnionArray.from_dense(pa.array(type_ids, pa.int8()), pa.array(offsets, pa.int32()), children,
                                     [f.name for f in _INFO_VALUE])
    return pa.Table.from_arrays([pa.array(names, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


class FlightSqlService:
    """The Flight SQL commands of one Flight server, answered from `backend`. `locations` go into every
    endpoint (a replica's advertised location, or none: the same server)."""

    def __init__(self, backend: SqlBackend, max_query_bytes: int = MAX_QUERY_BYTES) -> None:
        self.backend = backend
        self.max_query_bytes = max_query_bytes
        self.locations: list[flight.Location] = []

    # -- GetFlightInfo and GetSchema
    def flight_info(self, who, descriptor: flight.FlightDescriptor, command: proto.Message) -> flight.FlightInfo:
        schema, ticket = self._plan(who, command)
        endpoint = flight.FlightEndpoint(ticket, self.locations)
        return flight.FlightInfo(schema, descriptor, [endpoint], -1, -1)

    def schema(self, who, command: proto.Message) -> pa.Schema:
        return self._plan(who, command)[0]

    def _plan(self, who, command: proto.Message) -> tuple[pa.Schema, bytes]:
        """The result's schema and the ticket that fetches it."""
        if isinstance(command, (proto.CommandStatementQuery, proto.CommandPreparedStatementQuery)):
            sql, params = ((command.query, None) if isinstance(command, proto.CommandStatementQuery)
                           else statement_of(command.prepared_statement_handle))
            self._refuse_transaction(command)
            schema = self.backend.describe(who, checked_query(sql, self.max_query_bytes), params)
            return schema, proto.pack_any(proto.TicketStatementQuery(make_handle(sql, params)))
        return self._metadata_schema(command), proto.pack_any(command)

    @staticmethod
    def _refuse_transaction(command) -> None:
        if getattr(command, "transaction_id", None):
            raise pa.ArrowNotImplementedError("transactions are not supported: this server is read-only")

    @staticmethod
    def _metadata_schema(command: proto.Message) -> pa.Schema:
        if isinstance(command, proto.CommandGetTables):
            return TABLES_WITH_SCHEMA_SCHEMA if command.include_schema else TABLES_SCHEMA
        schema = {proto.CommandGetSqlInfo: SQL_INFO_SCHEMA, proto.CommandGetCatalogs: CATALOGS_SCHEMA,
                  proto.CommandGetDbSchemas: DB_SCHEMAS_SCHEMA, proto.CommandGetTableTypes: TABLE_TYPES_SCHEMA,
                  proto.CommandGetPrimaryKeys: PRIMARY_KEYS_SCHEMA, proto.CommandGetExportedKeys: FOREIGN_KEYS_SCHEMA,
                  proto.CommandGetImportedKeys: FOREIGN_KEYS_SCHEMA,
                  proto.CommandGetCrossReference: FOREIGN_KEYS_SCHEMA}.get(type(command))
        if schema is None:
            if isinstance(command, proto._Write):
                raise pa.ArrowNotImplementedError(f"{command.NAME}: this server is read-only (SELECT queries only)")
            raise pa.ArrowInvalid(f"{command.NAME} is not a command for GetFlightInfo")
        return schema

    # -- DoGet
    def do_get(self, who, message: proto.Message,
               cancelled: Callable[[], bool]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]] | pa.Table:
        """A statement's result (schema and batches, streamed) or a metadata command's table."""
        if isinstance(message, proto.TicketStatementQuery):
            sql, params = statement_of(message.statement_handle)
            return self.backend.execute(who, checked_query(sql, self.max_query_bytes), cancelled, params)
        if isinstance(message, proto.CommandGetSqlInfo):
            return sql_info_table(message.info)
        if isinstance(message, proto.CommandGetCatalogs):
            return pa.table({"catalog_name": [CATALOG]}, schema=CATALOGS_SCHEMA)
        if isinstance(message, proto.CommandGetDbSchemas):
            keep = (message.catalog in (None, CATALOG)) and like(message.db_schema_filter_pattern)(DB_SCHEMA)
            return pa.table({"catalog_name": [CATALOG] * keep, "db_schema_name": [DB_SCHEMA] * keep},
                            schema=DB_SCHEMAS_SCHEMA)
        if isinstance(message, proto.CommandGetTableTypes):
            return pa.table({"table_type": ["TABLE"]}, schema=TABLE_TYPES_SCHEMA)
        if isinstance(message, proto.CommandGetTables):
            return self._tables(who, message)
        return self._metadata_schema(message).empty_table()  # keys: none; anything else is refused there

    def _tables(self, who, command: proto.CommandGetTables) -> pa.Table:
        schema = TABLES_WITH_SCHEMA_SCHEMA if command.include_schema else TABLES_SCHEMA
        if (command.catalog not in (None, CATALOG) or not like(command.db_schema_filter_pattern)(DB_SCHEMA)
                or (command.table_types and "TABLE" not in command.table_types)):
            return schema.empty_table()
        matches = like(command.table_name_filter_pattern)
        rows = sorted((name, table_schema) for name, table_schema in
                      self.backend.tables(who, command.include_schema) if matches(name))
        columns = {"catalog_name": [CATALOG] * len(rows), "db_schema_name": [DB_SCHEMA] * len(rows),
                   "table_name": [name for name, _ in rows], "table_type": ["TABLE"] * len(rows)}
        if command.include_schema:
            columns["table_schema"] = [s.serialize().to_pybytes() for _, s in rows]
        return pa.table(columns, schema=schema)

    # -- DoAction (poc.flight_actions: add_sql_actions below puts these in a server's table)
    def create_prepared(self, who, body: bytes | None) -> list[bytes]:
        message = sql_command(body) if body is not None else None
        if not isinstance(message, proto.ActionCreatePreparedStatementRequest):
            raise pa.ArrowInvalid("CreatePreparedStatement needs an ActionCreatePreparedStatementRequest")
        self._refuse_transaction(message)
        sql = checked_query(message.query, self.max_query_bytes)
        schema, parameters = self.backend.prepare(who, sql)
        result = proto.ActionCreatePreparedStatementResult(make_handle(sql), schema.serialize().to_pybytes(),
                                                           parameters.serialize().to_pybytes() if parameters else b"")
        return [proto.pack_any(result)]

    @staticmethod
    def close_prepared(body: bytes | None) -> list[bytes]:
        message = sql_command(body) if body is not None else None
        if not isinstance(message, proto.ActionClosePreparedStatementRequest):
            raise pa.ArrowInvalid("ClosePreparedStatement needs an ActionClosePreparedStatementRequest")
        statement_of(message.prepared_statement_handle)  # a handle of this server: nothing to free
        return []

    @staticmethod
    def refuse_put(command: proto.Message | None) -> Exception:
        """DoPut other than binding a query's parameters: updates and ingestion write, and this server is
        read-only (executemany sends its rows as an update)."""
        if isinstance(command, proto._Write):
            return pa.ArrowNotImplementedError(f"{command.NAME}: this server is read-only (SELECT queries only; "
                                               "bind one row of parameters to a query, not several)")
        return pa.ArrowNotImplementedError("this server is read-only: DoPut binds a prepared query's parameters "
                                           "only")


def bind_parameters(command: proto.Message | None, reader: flight.MetadataRecordBatchReader) -> bytes:
    """DoPut on a prepared statement: its parameters, one row of values, bound into a new handle that carries
    them (`DoPutPreparedStatementResult`, the PutResult's metadata). Nothing runs yet and no state is kept:
    the query runs when the new handle's FlightInfo is redeemed. Anything else a DoPut asks writes: refused."""
    if not isinstance(command, proto.CommandPreparedStatementQuery):
        raise FlightSqlService.refuse_put(command)
    sql, _ = statement_of(command.prepared_statement_handle)
    try:
        values = from_arrow(read_bounded(reader, bound.MAX_PARAM_BYTES + 64 * 1024))
    except bound.ParamError as exc:
        raise pa.ArrowInvalid(f"parameters refused: {exc}") from None
    handle = make_handle(sql, values)
    if len(handle) > proto.MAX_COMMAND_BYTES:
        raise pa.ArrowInvalid("the query and its parameters are over the size of a handle")
    return proto.DoPutPreparedStatementResult(handle).encode()  # the PutResult's metadata is the message itself


def read_bounded(reader: flight.MetadataRecordBatchReader, max_bytes: int) -> pa.Table:
    """A DoPut's batches, read until its end or refused once they pass `max_bytes` (a client streaming without
    end is cut off, not held in memory)."""
    batches, size = [], 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is None:
            continue
        size += chunk.data.nbytes
        if size > max_bytes:
            raise bound.ParamError(f"parameters over {max_bytes} bytes")
        batches.append(chunk.data)
    return pa.Table.from_batches(batches, schema=reader.schema)


def add_sql_actions(actions: Actions, service: Callable[[], FlightSqlService]) -> None:
    """Flight SQL's actions in a server's table, answered by `service()` (the direct server makes its own at
    the first Flight SQL call)."""
    actions.add("CreatePreparedStatement", "create a prepared statement (one SELECT; its parameters bound by DoPut)",
                lambda who, body: service().create_prepared(who, body))
    actions.add("ClosePreparedStatement", "close a prepared statement",
                lambda who, body: FlightSqlService.close_prepared(body))  # a handle holds no state to free


def serve_result(result, on_batches: Callable[[pa.Schema, Iterator[pa.RecordBatch]], flight.FlightDataStream]):
    """A do_get result as a Flight stream: a table whole, a (schema, batches) pair through `on_batches`."""
    if isinstance(result, pa.Table):
        return flight.RecordBatchStream(result)
    schema, batches = result
    return on_batches(schema, batches)
