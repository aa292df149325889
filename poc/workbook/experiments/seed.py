"""One experiment run: components up, load against direct and tunnel, samples, everything written out."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from ...config import DB_CONNECTIONS, ConfigError, make_tenants, parse_delay
from ..dataset import dataset_folder
from ..params import RunParams
from ..load.client import LoadConfig, records_as_dicts, run_load
from ..load.metrics import add_overhead, percentiles_table, success_table, summaries, to_frame
from ..servers.runner import Cluster, ProcessSampler, machine_info

TUNNEL_TARGETS = {"websocket": "tunnel", "flight": "flight_tunnel"}  # transport → target label in the results


@dataclass
class ExperimentParams(RunParams):
    """The parameters cell of the notebooks, and the keys of parameters/*.yaml."""

    rows: int = 1_000_000
    requests: int = 1000
    concurrency: int = 100
    tenant_count: int = 5
    delay_ms: str = "250"
    dataset: str = "sales"
    repetitions: int = 1
    timeout_s: float = 300.0
    sample_interval_s: float = 0.5
    seed: int = 42
    tunnels: str = "websocket,flight"  # tunnel transports measured beside direct, each with its own tenants
    source: str = "parquet"  # where connectors and the direct server read: parquet (memory) or postgresql
    gateway_args: str = ""  # more gateway options, as on its command line (e.g. "--tunnel-rcvbuf-bytes 0")

    def __post_init__(self) -> None:
        self.delay_ms = str(self.delay_ms)
        parse_delay(self.delay_ms)
        for name in ("rows", "requests", "concurrency", "tenant_count", "repetitions"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"parameter {name} must be >= 1, got {getattr(self, name)!r}")
        super().__post_init__()
        if not self.tunnel_list or set(self.tunnel_list) - set(TUNNEL_TARGETS):
            raise ConfigError(f"parameter tunnels must name some of {', '.join(TUNNEL_TARGETS)}, got {self.tunnels!r}")
        if self.source not in ("parquet", "postgresql"):
            raise ConfigError(f"parameter source must be parquet or postgresql, got {self.source!r}")
        if self.gateway_args:
            import contextlib
            import io

            from ...cli import build_parser

            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said):
                    build_parser().parse_args(["gateway", "--tenants", "-", *self.gateway_arg_list])
            except ValueError as exc:  # shlex: an unclosed quote
                raise ConfigError(f"parameter gateway_args {self.gateway_args!r}: {exc}") from None
            except SystemExit:
                reason = said.getvalue().strip().splitlines()[-1:] or [""]
                raise ConfigError(f"parameter gateway_args {self.gateway_args!r}: {reason[0]}") from None

    @property
    def gateway_arg_list(self) -> list[str]:
        import shlex

        return shlex.split(str(self.gateway_args))

    @property
    def tunnel_list(self) -> list[str]:
        return [t.strip() for t in str(self.tunnels).split(",") if t.strip()]

    @property
    def targets(self) -> list[str]:
        return ["direct"] + [TUNNEL_TARGETS[t] for t in self.tunnel_list]



@dataclass
class ExperimentResult:
    params: ExperimentParams
    requests: pl.DataFrame
    samples: pl.DataFrame
    machine: dict
    summaries: dict = field(default_factory=dict)
    extraction_ms: list[float] = field(default_factory=list)  # source postgresql: DoGet to first batch, direct
    # per tunnel target, the tenants whose connector's --compression auto turned compression on during the run
    # (tenant → times): on loopback it should not, and their figures then include the gateway's decompression
    compressed_switches: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir

    def gateway_cpu_pct(self, target: str = "tunnel") -> float | None:
        """Mean gateway CPU while `target` load ran, as % of the whole machine."""
        rows = self.samples.filter((pl.col("process") == "gateway") & (pl.col("phase").str.starts_with(target)))
        return float(rows["cpu_percent"].mean()) / self.machine["cores"] if rows.height else None

    def percentiles(self) -> pl.DataFrame:
        return percentiles_table(self.requests)

    @property
    def tunnel_targets(self) -> list[str]:
        return [t for t in self.params.targets if t != "direct"]

    def success(self, target: str | None = None) -> pl.DataFrame:
        """The seed's criteria for one tunnel (the first by default)."""
        target = target or self.tunnel_targets[0]
        return success_table(self.summaries[target]["overall"], self.gateway_cpu_pct(target), self.machine["label"],
                             self.summaries.get("direct", {}).get("overall"))


def run_experiment(params: ExperimentParams, progress: bool | None = None) -> ExperimentResult:
    """Make or reuse the dataset, start everything, load direct and tunnel in the same run, stop everything."""
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_folder(params.data_dir, params.rows, params.seed, params.dataset)
    # Each tunnel transport gets its own tenants: a tenant has one live link, so one transport at a time.
    tunnels = params.tunnel_list
    tenants = make_tenants(params.tenant_count * len(tunnels))
    groups = {t: list(tenants.values())[i * params.tenant_count:(i + 1) * params.tenant_count]
              for i, t in enumerate(tunnels)}
    tokens = {TUNNEL_TARGETS[t]: {c.tenant_id: c.client_token for c in group} for t, group in groups.items()}
    tokens["direct"] = tokens[TUNNEL_TARGETS[tunnels[0]]]
    machine = machine_info()
    records: list[dict] = []
    extraction_ms: list[float] = []
    with contextlib.ExitStack() as stack:
        connector_args, env, direct_args = (), {}, None
        if params.source == "postgresql":  # the table lives in a real PostgreSQL; every DoGet reads it there
            from ..servers.postgres_server import postgres_source

            _, sources, env = stack.enter_context(postgres_source(out, data / f"{params.dataset}.parquet",
                                                                  params.dataset))
            # Each tenant's connector has its own connections; the one direct server serving them all gets as many.
            connector_args = ("--sources", str(sources))
            direct_args = ("--sources", str(sources), "--db-connections", str(DB_CONNECTIONS * params.tenant_count))
        cluster = stack.enter_context(Cluster(
            out / "cluster", tenants, data, delay_ms=params.delay_ms, with_connectors=False,
            gateway_args=("--request-timeout-s", str(params.timeout_s), *params.gateway_arg_list),
            direct_args=direct_args, direct_env=env))
        for tunnel, group in groups.items():
            for creds in group:
                cluster.start_connector(creds.tenant_id, url=cluster.tunnel_url(tunnel=tunnel),
                                        data="" if direct_args else None, extra=connector_args, env=env)
        cluster.wait_online(list(tenants), timeout=60)
        pids = {"load-client": os.getpid(), **{name: c.pid for name, c in cluster.components.items()}}
        uris = {target: cluster.flight_uri for target in params.targets}
        uris["direct"] = cluster.direct_uri
        with ProcessSampler(pids, params.sample_interval_s) as sampler:
            for rep in range(params.repetitions):
                for target in (params.targets if rep % 2 == 0 else params.targets[::-1]):
                    sampler.set_phase(f"{target}#{rep}")
                    cfg = LoadConfig(uris[target], tokens[target], params.requests, params.concurrency,
                                     params.dataset, params.timeout_s, target, progress)
                    for r in records_as_dicts(run_load(cfg)):
                        records.append({**r, "repetition": rep})
                    sampler.set_phase("")
        samples = pl.DataFrame(sampler.samples, schema={"t_s": pl.Float64, "process": pl.Utf8, "pid": pl.Int64,
                                                        "phase": pl.Utf8, "cpu_percent": pl.Float64,
                                                        "rss_mb": pl.Float64})
        if params.source == "postgresql":
            extraction_ms = first_batch_ms(cluster.direct_uri, tokens["direct"], params.dataset)
        switches = {TUNNEL_TARGETS[t]: {c.tenant_id: n for c in group
                                        if (n := cluster.compressed_switches(c.tenant_id))}
                    for t, group in groups.items()}
    df = add_overhead(to_frame(records))
    result = ExperimentResult(params, df, samples, machine, summaries(df), extraction_ms, switches)
    write_results(result)
    return result


def first_batch_ms(uri: str, tokens: dict[str, str], dataset: str, calls: int = 10) -> list[float]:
    """The extraction the seed assumed to take 200-250 ms, measured: a DoGet's time to its first batch on the
    direct server reading from the database, one call at a time."""
    import time

    import pyarrow.flight as flight

    token = next(iter(tokens.values()))
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())], timeout=120)
    out = []
    with flight.connect(uri) as client:
        for _ in range(calls):
            ticket = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", dataset), options).endpoints[0].ticket
            start = time.perf_counter()
            reader = client.do_get(ticket, options)
            reader.read_chunk()
            out.append((time.perf_counter() - start) * 1000)
            reader.cancel()
    return out


def write_results(result: ExperimentResult) -> None:
    """results.json (seed field names, per-tenant summaries), results.parquet, samples, tables, machine."""
    out = result.out_dir
    doc = {"params": asdict(result.params), "machine": result.machine, "summaries": result.summaries,
           "extraction_ms": result.extraction_ms, "compressed_switches": result.compressed_switches,
           "gateway_cpu_pct": {t: result.gateway_cpu_pct(t) for t in result.params.targets},
           "requests": result.requests.to_dicts()}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    result.requests.write_parquet(out / "results.parquet")
    result.samples.write_parquet(out / "samples.parquet")
    result.percentiles().write_csv(out / "percentiles.csv")
    pl.concat([result.success(t).with_columns(pl.lit(t).alias("path")) for t in result.tunnel_targets]
              ).write_csv(out / "success.csv")
    (out / "machine.json").write_text(json.dumps(result.machine, indent=1))
