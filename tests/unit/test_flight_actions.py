"""The Flight actions' table: what is named answers, everything else is refused with the list."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from poc.flight_actions import Actions
from poc.sql import proto
from poc.sql.service import add_sql_actions, make_handle


def test_an_action_runs_its_handler_with_the_caller_and_body():
    actions = Actions()
    actions.add("Echo", "answer the body back", lambda who, body: [who.encode(), body or b""])
    actions.add("Nothing", "answer nothing", lambda who, body: [])
    assert actions.types() == [("Echo", "answer the body back"), ("Nothing", "answer nothing")]
    assert actions.run("tenant_001", flight.Action("Echo", b"hi")) == [b"tenant_001", b"hi"]


def test_an_action_not_in_the_table_is_refused_naming_those_that_are():
    actions = Actions()
    actions.add("Echo", "answer the body back", lambda who, body: [body])
    with pytest.raises(pa.ArrowNotImplementedError, match="'Drop' is not supported.*actions: Echo"):
        actions.run("tenant_001", flight.Action("Drop", b""))


def test_an_action_offered_twice_is_a_mistake():
    actions = Actions()
    actions.add("Echo", "", lambda who, body: [])
    with pytest.raises(ValueError, match="twice"):
        actions.add("Echo", "", lambda who, body: [])


def test_flight_sql_puts_its_prepared_statements_in_the_table():
    actions = Actions()
    add_sql_actions(actions, lambda: pytest.fail("closing a handle needs no service state"))
    assert [name for name, _ in actions.types()] == ["CreatePreparedStatement", "ClosePreparedStatement"]
    close = proto.pack_any(proto.ActionClosePreparedStatementRequest(make_handle("SELECT 1")))
    assert actions.run("tenant_001", flight.Action("ClosePreparedStatement", close)) == []
    with pytest.raises(pa.ArrowInvalid, match="needs an ActionClosePreparedStatementRequest"):
        actions.run("tenant_001", flight.Action("ClosePreparedStatement", b""))
