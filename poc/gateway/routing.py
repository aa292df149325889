"""Where a call is served: the one interface the Flight, Flight SQL and HTTP handlers call (`Router`), and its
implementation for a gateway alone (`LocalRouter`: every call through this gateway's tunnels). Replicas sharing a
registry wrap it in poc.gateway.cluster.ClusterRouter, which serves a call here when this replica holds the
tenant's tunnel and forwards it to the one that does otherwise."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import TicketSigner, dataset_from_descriptor
from ..flight_actions import Actions
from ..sql.proto import TicketStatementQuery, pack_any
from ..sql.service import FlightSqlService, add_sql_actions, checked_query, descriptor_command, make_handle, sql_command
from .. import errors
from .bridge import TunnelBridge
from .peer_resume import read_resume_ticket

QUERY_LABEL = "(sql)"  # the dataset label of a query's stream in metrics and usage

Stream = tuple[pa.Schema, Iterator[pa.RecordBatch]]


class Router(Protocol):
    """Every call a client can make, for the caller `who` (its tenant, request id, and for a forwarded call the
    tunnel's epoch). `do_get` answers a stream (schema and batches) or a metadata command's whole table."""

    def flight_info(self, who, descriptor: flight.FlightDescriptor) -> flight.FlightInfo: ...

    def schema(self, who, descriptor: flight.FlightDescriptor) -> pa.Schema: ...

    def list_flights(self, who) -> list[flight.FlightInfo]: ...

    def action_types(self) -> list[tuple[str, str]]: ...

    def do_action(self, who, action: flight.Action) -> list[bytes]: ...

    def do_get(self, who, ticket: flight.Ticket, cancelled: Callable[[], bool]) -> Stream | pa.Table: ...

    def dataset_names(self, who) -> list[str]: ...

    def read_dataset(self, who, name: str) -> Stream: ...

    def run_query(self, who, sql: str) -> Stream: ...


class TunnelSql:
    """Flight SQL through the tenant's tunnel: the tables are the datasets its connector registered (their
    schemas asked of it), and queries run at the connector (protocol 1.5 `query_info`, `query`)."""

    def __init__(self, bridge: TunnelBridge) -> None:
        self._bridge = bridge

    def tables(self, who, with_schemas: bool) -> list[tuple[str, pa.Schema | None]]:
        names, _ = self._bridge.datasets(who)
        if not with_schemas:
            return [(name, None) for name in names]
        return [(name, self._bridge.flight_info(who, name)[0]) for name in names]

    def describe(self, who, sql: str, params: list | None = None) -> pa.Schema:
        return self._bridge.flight_info(who, QUERY_LABEL, sql=sql, params=params)[0]

    def prepare(self, who, sql: str) -> tuple[pa.Schema, pa.Schema]:
        reply, _ = self._bridge.ask_info(who, QUERY_LABEL, sql=sql)
        return reply.schema, reply.parameters or pa.schema([])  # a connector before 1.7 binds none

    def execute(self, who, sql: str, cancelled, params: list | None = None):
        stream = self._bridge.open_stream(who, QUERY_LABEL, cancelled, sql=sql, params=params)
        return stream.schema, stream.batches()


class LocalRouter:
    """Every call through this gateway's tunnels (the bridge picks the caller's link). `locations` go into every
    endpoint: none alone (the same server), this replica's advertised location with replicas."""

    def __init__(self, bridge: TunnelBridge, tickets: TicketSigner) -> None:
        self.bridge = bridge
        self.tickets = tickets
        self.sql = FlightSqlService(TunnelSql(bridge))
        self.actions = Actions()  # the Flight actions this gateway answers (poc.flight_actions)
        add_sql_actions(self.actions, lambda: self.sql)
        self.locations: list[flight.Location] = []

    def set_locations(self, locations: list[flight.Location]) -> None:
        self.locations = locations
        self.sql.locations = locations

    def _dataset_info(self, who, name: str, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        schema, rows, size, epoch = self.bridge.flight_info(who, name)
        endpoint = flight.FlightEndpoint(self.tickets.issue(who.tenant_id, name, epoch), self.locations)
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, size)

    def flight_info(self, who, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        command = descriptor_command(descriptor)
        if command is not None:  # Flight SQL (poc.sql.service)
            return self.sql.flight_info(who, descriptor, command)
        return self._dataset_info(who, dataset_from_descriptor(descriptor), descriptor)

    def schema(self, who, descriptor: flight.FlightDescriptor) -> pa.Schema:
        command = descriptor_command(descriptor)
        if command is None:
            return self.flight_info(who, descriptor).schema
        return self.sql.schema(who, command)

    def list_flights(self, who) -> list[flight.FlightInfo]:
        names, _ = self.bridge.datasets(who)
        return [self._dataset_info(who, name, flight.FlightDescriptor.for_path("dataset", name)) for name in names]

    def action_types(self) -> list[tuple[str, str]]:
        return self.actions.types()

    def do_action(self, who, action: flight.Action) -> list[bytes]:
        return self.actions.run(who, action)

    def claims(self, who, ticket: flight.Ticket) -> tuple[str, int]:
        """The dataset and tunnel epoch a dataset ticket names; refused unless it is the caller's tenant's."""
        return self.tickets.claims(ticket.ticket, who.tenant_id)

    def do_get(self, who, ticket: flight.Ticket, cancelled: Callable[[], bool]) -> Stream | pa.Table:
        message = sql_command(ticket.ticket)
        if message is not None:  # a Flight SQL ticket: a statement's result, or a metadata command's table
            return self.sql.do_get(who, message, cancelled)
        resume = read_resume_ticket(ticket.ticket)
        if resume is not None:  # another replica resuming a stream cut off there (poc.gateway.peer_resume)
            if who.peer_epoch is None:
                raise errors.Forbidden("a resume ticket is accepted only from another replica of this gateway")
            stream = self.bridge.open_stream(who, resume.dataset, cancelled, resume=resume)
            return stream.schema, stream.batches()
        dataset, _ = self.claims(who, ticket)
        stream = self.bridge.open_stream(who, dataset, cancelled)
        return stream.schema, stream.batches()

    def dataset_names(self, who) -> list[str]:
        return self.bridge.datasets(who)[0]

    def read_dataset(self, who, name: str) -> Stream:
        stream = self.bridge.open_stream(who, name)
        return stream.schema, stream.batches()

    def run_query(self, who, sql: str) -> Stream:
        return self.sql.backend.execute(who, checked_query(sql), lambda: False)


def query_ticket(sql: str) -> flight.Ticket:
    """The ticket of a statement's result, as Flight SQL clients redeem it."""
    return flight.Ticket(pack_any(TicketStatementQuery(make_handle(checked_query(sql)))))
