from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from poc.config import make_tenants
from poc.workbook.dataset import write_dataset
from poc.workbook.servers.runner import Cluster


# Property tests check what code does, never how fast: a shared machine's pauses must not fail them.
settings.register_profile("poc", deadline=None)
settings.load_profile("poc")


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two data folders with different tables under the same names, and a large single table."""
    root = tmp_path_factory.mktemp("data")
    return {
        "a": write_dataset(200_000, root / "a" / "sales.parquet", seed=1).parent,
        "b": write_dataset(150_000, root / "b" / "sales.parquet", seed=2).parent,
        "small": write_dataset(20_000, root / "small" / "sales.parquet", seed=3).parent,
        "large": write_dataset(1_000_000, root / "large" / "sales.parquet", seed=4).parent,
    }


@pytest.fixture(scope="session")
def tenant_data(tmp_path_factory) -> dict[str, Path]:
    """A data folder per tenant (tenant_001…tenant_006), each a different table (other rows, other sizes), so a
    test that reads a tenant's data can tell it from any other tenant's."""
    root = tmp_path_factory.mktemp("tenant-data")
    return {f"tenant_{i:03d}": write_dataset(15_000 + 1_000 * i, root / f"t{i}" / "sales.parquet", seed=20 + i).parent
            for i in range(1, 7)}


@pytest.fixture(scope="session")
def _orders(datasets) -> Path:
    return write_dataset(2_000, datasets["a"] / "orders.parquet", seed=5)


@pytest.fixture
def tenants():
    return make_tenants(2)


@pytest.fixture
def cluster(tmp_path, tenants, datasets, _orders):
    """Gateway, one connector per tenant (data folder 'a') and a direct server, delay 0."""
    with Cluster(tmp_path / "cluster", tenants, datasets["a"]) as running:
        yield running
