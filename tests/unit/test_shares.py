"""The buffer budget's rules (poc/gateway/shares.py): growth never takes the room new streams need."""

from __future__ import annotations

import pytest

from poc.errors import Unavailable
from poc.gateway.shares import BufferBudget

MiB = 1 << 20


def test_a_tenants_grown_windows_leave_room_for_its_own_new_streams():
    """Found by `python -m poc bench` on the (since retired) gRPC tunnel: 100 streams of one tenant whose windows grew towards
    64 MiB filled the tenant's 1 GiB share, and its next DoGet was refused. Growth stops at half the share."""
    budget = BufferBudget(limit=2048 * MiB, tenant_limit=1024 * MiB)
    for _ in range(10):
        budget.reserve("t1", 8 * MiB)  # ten streams at their initial window: 80 MiB
    grown = 0
    while budget.try_grow("t1", 8 * MiB):
        grown += 8 * MiB
    assert budget.held_by("t1") <= 512 * MiB and grown == 432 * MiB  # up to half the share, no further
    for _ in range(64):  # the room left is the other half: 64 more streams at their initial window
        budget.reserve("t1", 8 * MiB)
    with pytest.raises(Unavailable, match="at its share"):
        budget.reserve("t1", 8 * MiB)  # the share itself still holds


def test_growth_stops_at_half_the_whole_budget_and_every_tenant_keeps_its_share():
    budget = BufferBudget(limit=1024 * MiB, tenant_limit=512 * MiB)
    budget.reserve("t1", 8 * MiB)
    budget.reserve("t2", 8 * MiB)
    while budget.try_grow("t1", 8 * MiB) | budget.try_grow("t2", 8 * MiB):
        pass
    assert budget.reserved <= 512 * MiB  # half the budget, whoever grew
    budget.reserve("t3", 256 * MiB)  # a third tenant still finds room
    budget.release("t1", budget.held_by("t1"))
    assert budget.held_by("t1") == 0 and budget.reserved == budget.held_by("t2") + 256 * MiB


def test_without_a_tenant_share_only_the_whole_budget_bounds():
    budget = BufferBudget(limit=64 * MiB, tenant_limit=0)
    budget.reserve("t1", 32 * MiB)
    assert not budget.try_grow("t1", 1 * MiB)  # already at half the budget
    budget.reserve("t1", 32 * MiB)
    with pytest.raises(Unavailable, match="buffer limit"):
        budget.reserve("t2", 1)
