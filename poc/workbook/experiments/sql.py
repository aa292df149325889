"""The sql notebook: what pushing a query down to the connector saves, against fetching the whole dataset and
filtering at the client, through the tunnel and on the direct server (the same SQL surface, no tunnel).

Every query is sent by ADBC's Flight SQL driver, as a data engineer's tool would; the whole-dataset path is a
plain Flight DoGet followed by the same SQL run at the client (DuckDB over the Arrow table it received). Bytes
moved through the tunnel are the gateway's own count (`poc_gateway_relayed_bytes_total`), bytes on the direct
path the Arrow IPC size of what the client received; results are checked against the same SQL run locally.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from ..dataset import dataset_folder
from ..params import RowsResult, RunParams
from ..servers.runner import Cluster, machine_info

QUERIES = {
    "selective": "SELECT id, value, amount FROM sales WHERE id % 100 = 7",  # 1 % of the rows, 3 of 4 columns
    "group_by": "SELECT id % 100 AS bucket, count(*) AS n, sum(amount) AS total, avg(amount) AS mean "
                "FROM sales GROUP BY 1",
}


@dataclass
class SqlParams(RunParams):
    """The sql notebook's parameters (parameters/sql.yaml names only what differs)."""

    RUN_PREFIX = "sql"

    rows: int = 1_000_000    # the seed's table (about 50 MB of Arrow IPC)
    repetitions: int = 7     # timed runs per path, query and method (median reported), after one warm-up
    timeout_s: float = 120.0
    source: str = "parquet"  # the table in Parquet (DuckDB at the connector) or in PostgreSQL (queries run there)

    def __post_init__(self) -> None:
        from ...config import ConfigError

        if self.rows < 100 or self.repetitions < 1:
            raise ConfigError("rows must be at least 100 and repetitions at least 1")
        if self.source not in ("parquet", "postgresql"):
            raise ConfigError(f"source must be parquet or postgresql, got {self.source!r}")
        super().__post_init__()


class SqlResult(RowsResult):
    """The sql notebook's measurements, a row each."""


def _ipc_bytes(table: pa.Table) -> int:
    return table.schema.serialize().size + sum(b.serialize().size for b in table.to_batches())


def _relayed_bytes(cluster: Cluster) -> float:
    """The gateway's count of Arrow IPC bytes relayed to clients, all tenants."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{cluster.host}:{cluster.gateway.ready['http_port']}/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.admin_token}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               if family.name == "poc_gateway_relayed_bytes" for s in family.samples if s.name.endswith("_total"))


def _local(folder: Path, sql: str, table: pa.Table | None = None) -> pa.Table:
    """The query run here: over the Parquet file, or over `table` (what the client fetched whole)."""
    import duckdb

    con = duckdb.connect()
    if table is None:
        con.execute(f"CREATE VIEW sales AS SELECT * FROM read_parquet('{folder / 'sales.parquet'}')")
    else:
        con.register("sales", table)
    return con.sql(sql).to_arrow_table()


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(name, "ascending") for name in table.schema.names])


def _check(got: pa.Table, expected: pa.Table, what: str) -> None:
    """Rows equal to the local query's; float aggregates within rounding (their order of addition varies)."""
    if got.num_rows != expected.num_rows or got.schema.names != expected.schema.names:
        raise AssertionError(f"{what}: {got.num_rows} rows {got.schema.names}, expected {expected.num_rows} "
                             f"{expected.schema.names}")
    for name in got.schema.names:
        a, b = got[name].to_pylist(), expected[name].to_pylist()
        if pa.types.is_floating(got.schema.field(name).type):
            if any(abs(x - y) > 1e-9 * max(1.0, abs(y)) for x, y in zip(a, b)):
                raise AssertionError(f"{what}: column {name} differs from the local query")
        elif a != b:
            raise AssertionError(f"{what}: column {name} differs from the local query")


def _timed(runs: int, call: Callable[[], tuple[pa.Table, float]]) -> tuple[list[float], pa.Table, float]:
    call()  # warm-up: connections, the engine's first query
    times, result, moved = [], None, 0.0
    for _ in range(runs):
        start = time.perf_counter()
        result, moved = call()
        times.append((time.perf_counter() - start) * 1000)
    return times, result, moved


def run_sql(params: SqlParams, progress: Callable[[str], None] = lambda _: None) -> SqlResult:
    import adbc_driver_flightsql.dbapi as flight_sql
    from adbc_driver_flightsql import DatabaseOptions

    from ...config import make_tenants

    folder = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(1)
    token = next(iter(tenants.values())).client_token
    result = SqlResult(params, machine=machine_info())
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())],
                                       timeout=params.timeout_s)
    with contextlib.ExitStack() as stack:
        connector, direct_args, env = {}, None, {}
        if params.source == "postgresql":  # the table in a real PostgreSQL: DoGets and queries run there
            from ..servers.postgres_server import postgres_source

            _, sources, env = stack.enter_context(postgres_source(out, folder / "sales.parquet", "sales"))
            connector = {"data": "", "extra": ("--sources", str(sources)), "env": env}
            direct_args = ("--sources", str(sources))
        cluster = stack.enter_context(Cluster(out / "cluster", tenants, folder, delay_ms="0", with_connectors=False,
                                              direct_args=direct_args, direct_env=env))
        for tenant_id in tenants:
            cluster.start_connector(tenant_id, **connector)
        cluster.wait_online(list(tenants))
        for path, uri in (("tunnel", cluster.flight_uri), ("direct", cluster.direct_uri)):
            def moved(before: float, table: pa.Table) -> float:
                return _relayed_bytes(cluster) - before if path == "tunnel" else _ipc_bytes(table)

            with flight_sql.connect(uri, db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"},
                                    autocommit=True) as conn, flight.connect(uri) as client:
                for name, sql in QUERIES.items():
                    expected = _sorted(_local(folder, sql))

                    def pushed_down() -> tuple[pa.Table, float]:
                        before = _relayed_bytes(cluster) if path == "tunnel" else 0.0
                        with conn.cursor() as cursor:
                            cursor.execute(sql)
                            table = cursor.fetch_arrow_table()
                        return table, moved(before, table)

                    def whole() -> tuple[pa.Table, float]:
                        before = _relayed_bytes(cluster) if path == "tunnel" else 0.0
                        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", "sales"), options)
                        table = client.do_get(info.endpoints[0].ticket, options).read_all()
                        return _local(folder, sql, table), moved(before, table)

                    for method, call in (("sql pushed down", pushed_down), ("whole dataset, filtered at client", whole)):
                        times, got, size = _timed(params.repetitions, call)
                        _check(_sorted(got), expected, f"{path} {method} {name}")
                        result.rows.append({"path": path, "query": name, "method": method,
                                            "p50_ms": statistics.median(times), "min_ms": min(times),
                                            "bytes_moved": size, "result_rows": got.num_rows})
                        progress(f"{path:6} {name:9} {method:34} P50 {statistics.median(times):8.1f} ms, "
                                 f"{size / 1e6:8.2f} MB moved")
    return result


def answer(result: SqlResult) -> str:
    """The notebook's opening lines: what pushing the query down saves, through the tunnel."""
    rows = {(r["path"], r["query"], r["method"].split()[0]): r for r in result.rows}
    lines = ["**Answer:** push the query down: only its result crosses the customer's uplink."]
    for name in QUERIES:
        sql, whole = rows.get(("tunnel", name, "sql")), rows.get(("tunnel", name, "whole"))
        direct = rows.get(("direct", name, "sql"))
        if not (sql and whole and direct):
            continue
        lines.append(f"- **{name}**: through the tunnel the pushed-down query moved "
                     f"{sql['bytes_moved'] / 1e3:,.1f} kB against {whole['bytes_moved'] / 1e6:.1f} MB for the whole "
                     f"dataset ({whole['bytes_moved'] / max(sql['bytes_moved'], 1):.0f}× less) and answered in "
                     f"{sql['p50_ms']:.0f} ms against {whole['p50_ms']:.0f} ms (P50); the direct server answered "
                     f"the same SQL in {direct['p50_ms']:.0f} ms.")
    return "\n".join(lines)


def compare_engines(rows: int = 1_000_000, runs: int = 7, data_dir: str = "outputs/data") -> list[dict]:
    """The two candidate engines for the connector on the notebook's queries over the same Parquet file: DuckDB
    (what the connector uses) and polars SQL over a lazy scan; median time to the whole result, and whether
    the engine can hand the result over batch by batch (docs/architecture.md, "SQL at the connector"). Then
    the connector's own engine (poc.sql.engine: DuckDB over the datasets registered as Arrow datasets, each
    query parsed and checked against the allow-list first), batch by batch as the connector reads it."""
    import duckdb
    import polars as pl

    from ...sql.engine import SqlEngine

    file = dataset_folder(data_dir, rows) / "sales.parquet"
    con = duckdb.connect()
    con.execute(f"CREATE VIEW sales AS SELECT * FROM read_parquet('{file}')")
    ctx = pl.SQLContext(sales=pl.scan_parquet(file))
    connector = SqlEngine({"sales": file})

    def through_connector(sql: str) -> pa.Table:
        query = connector.start(sql)
        batches = []
        while (batch := connector.read(query)) is not None:
            batches.append(batch)
        query.close()
        return pa.Table.from_batches(batches, schema=query.schema)

    out = []
    for name, sql in QUERIES.items():
        for engine, run in (("duckdb", lambda: con.sql(sql).to_arrow_table()),
                            ("polars", lambda: ctx.execute(sql).collect().to_arrow()),
                            ("connector", lambda: through_connector(sql))):
            times, table, _ = _timed(runs, lambda: (run(), 0.0))
            out.append({"query": name, "engine": engine, "p50_ms": round(statistics.median(times), 1),
                        "rows": table.num_rows})
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m poc.workbook.experiments.sql",
                                     description="The notebook's queries on DuckDB, polars SQL and the connector's "
                                                 "engine over one Parquet file; one JSON line per query and engine.")
    parser.add_argument("rows", nargs="?", type=int, default=1_000_000, help="rows of the file (default 1000000)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("rows must be at least 1")
    for line in compare_engines(args.rows):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
