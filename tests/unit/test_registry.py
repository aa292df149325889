"""The gateway's local registry: which registration adds a link and which replaces one (protocol.md §2)."""

from __future__ import annotations

import pytest

from poc.config import make_tenants
from poc.errors import Unavailable
from poc.gateway.link import TenantLink
from poc.gateway.sinks import StreamSink
from poc.gateway.registry import TenantRegistry


def link(session: str, connector_id: str = "", tenant: str = "tenant_001") -> TenantLink:
    return TenantLink(tenant, session, ["sales"], transport=None, connector_id=connector_id)


def test_the_same_connector_id_replaces_another_adds():
    registry = TenantRegistry(make_tenants(1))
    a1, a2, b = link("s1", "c-a"), link("s2", "c-a"), link("s3", "c-b")
    assert registry.register(a1) is None
    assert registry.register(b) is None  # another connector: added
    assert registry.register(a2) is a1  # the same connector again: replaces its own link only
    assert {x.session_id for x in registry.tenant_links("tenant_001")} == {"s2", "s3"}
    registry.unregister(a1)  # already replaced: nothing changes
    assert len(registry.tenant_links("tenant_001")) == 2
    assert registry.snapshot()["tenant_001"]["tunnels_here"] == 2


def test_connectors_without_an_id_replace_each_other_as_before():
    registry = TenantRegistry(make_tenants(1))
    old, new = link("s1"), link("s2")
    registry.register(old)
    assert registry.register(new) is old
    assert registry.live("tenant_001") is new


def test_calls_go_to_the_link_with_fewest_open_streams_then_in_turn():
    registry = TenantRegistry(make_tenants(1))
    busy, idle = link("s1", "c-a"), link("s2", "c-b")
    registry.register(busy)
    registry.register(idle)
    busy._sinks[1] = StreamSink()
    assert {registry.local("tenant_001").session_id for _ in range(4)} == {"s2"}
    busy._sinks.clear()
    assert {registry.local("tenant_001").session_id for _ in range(4)} == {"s1", "s2"}
    idle.closing_reason = "closing"
    assert {registry.local("tenant_001").session_id for _ in range(4)} == {"s1"}


def test_a_draining_registry_serves_nothing_unless_asked_to():
    registry = TenantRegistry(make_tenants(1))
    registry.register(link("s1", "c-a"))
    registry.draining = True
    assert registry.local("tenant_001") is None
    assert registry.local("tenant_001", include_draining=True).session_id == "s1"
    with pytest.raises(Unavailable, match="shutting down"):
        registry.live("tenant_001")
