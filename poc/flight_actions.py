"""The Flight actions a server answers: one table of name → (description, handler), filled by what offers an
action (Flight SQL adds its prepared statements: poc.sql.service.add_sql_actions). ListActions lists the table;
DoAction runs the named handler and refuses every other name. A new action is one `add` where the server builds
its table (poc.gateway.routing.LocalRouter, poc.direct.DirectFlightServer)."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as flight

Handler = Callable[[object, bytes | None], list[bytes]]  # (who, the action's body) → the results' bodies


class Actions:
    def __init__(self) -> None:
        self._table: dict[str, tuple[str, Handler]] = {}

    def add(self, name: str, description: str, handler: Handler) -> None:
        if name in self._table:
            raise ValueError(f"action {name!r} is offered twice")
        self._table[name] = (description, handler)

    def types(self) -> list[tuple[str, str]]:
        """(name, description) of every action, in the order they were added."""
        return [(name, description) for name, (description, _) in self._table.items()]

    def run(self, who, action: flight.Action) -> list[bytes]:
        entry = self._table.get(action.type)
        if entry is None:
            raise pa.ArrowNotImplementedError(f"action {action.type[:100]!r} is not supported (read-only server; "
                                              f"actions: {', '.join(self._table)})")
        return entry[1](who, action.body.to_pybytes() if action.body is not None else None)
