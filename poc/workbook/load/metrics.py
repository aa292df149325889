"""From request records to the figures of a report: percentiles, error rate, throughput, overhead."""

from __future__ import annotations

import polars as pl

PHASES = ["connect_ms", "metadata_ms", "data_transfer_ms", "total_ms", "queued_ms"]
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}

# The seed's success criteria: (metric, target, threshold, "lower" or "higher" is better).
SEED_CRITERIA = [
    ("latency P50 (ms)", 600.0, 900.0, "lower"),
    ("latency P95 (ms)", 1200.0, 1800.0, "lower"),
    ("latency P99 (ms)", 2000.0, 2500.0, "lower"),
    ("error rate (%)", 2.0, 5.0, "lower"),
    ("throughput (req/s)", 40.0, 30.0, "higher"),
    ("gateway CPU (% of machine)", 80.0, 90.0, "lower"),
]


def to_frame(records: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(records, infer_schema_length=None)


def add_overhead(df: pl.DataFrame, baseline: str = "direct") -> pl.DataFrame:
    """`websocket_overhead_ms` (total) and per-phase overheads against the baseline's medians of the same run."""
    ok = df.filter((pl.col("target") == baseline) & (pl.col("status") == "success"))
    medians = {c: ok[c].median() for c in ("metadata_ms", "data_transfer_ms", "total_ms")} if ok.height else {}
    exprs = []
    for column, name in (("total_ms", "websocket_overhead_ms"), ("metadata_ms", "metadata_overhead_ms"),
                         ("data_transfer_ms", "data_transfer_overhead_ms")):
        median = medians.get(column)
        exprs.append(pl.when(pl.col("target") != baseline).then(pl.col(column) - median).otherwise(None)
                     .cast(pl.Float64).alias(name) if median is not None else pl.lit(None, pl.Float64).alias(name))
    return df.with_columns(exprs)


def summarize(df: pl.DataFrame) -> dict:
    """Counts, error rate, throughput and P50/P95/P99 per phase (phases over successful requests)."""
    n = df.height
    if n == 0:
        return {"requests": 0}
    ok = df.filter(pl.col("status") == "success")
    duration = float(df["ended_s"].max() - df["started_s"].min())
    summary = {
        "requests": n,
        "success": ok.height,
        "errors": int((df["status"] == "error").sum()),
        "timeouts": int((df["status"] == "timeout").sum()),
        "error_rate": 1 - ok.height / n,
        "duration_s": duration,
        "throughput_rps": ok.height / duration if duration > 0 else None,
        "rows_transferred": int(df["rows_transferred"].sum()),
        "bytes": int(df["bytes"].sum()),
        "throughput_mb_s": float(df["bytes"].sum()) / 1e6 / duration if duration > 0 else None,
    }
    for phase in PHASES + [c for c in ("websocket_overhead_ms",) if c in df.columns]:
        values = ok[phase].drop_nulls()
        summary[phase] = {q: (float(values.quantile(v, "linear")) if values.len() else None)
                          for q, v in QUANTILES.items()}
        summary[phase]["mean"] = float(values.mean()) if values.len() else None
    return summary


def summaries(df: pl.DataFrame) -> dict:
    """Per target: the overall summary and one per tenant."""
    out = {}
    for target in sorted(df["target"].unique().to_list()):
        part = df.filter(pl.col("target") == target)
        out[target] = {"overall": summarize(part),
                       "tenants": {t: summarize(part.filter(pl.col("tenant_id") == t))
                                   for t in sorted(part["tenant_id"].unique().to_list())}}
    return out


def percentiles_table(df: pl.DataFrame) -> pl.DataFrame:
    """target × phase → p50, p95, p99, mean over successful requests."""
    ok = df.filter(pl.col("status") == "success")
    long = ok.unpivot(index=["target"], on=[p for p in PHASES if p in ok.columns], variable_name="phase",
                      value_name="ms").drop_nulls("ms")
    return (long.group_by("target", "phase")
            .agg([pl.col("ms").quantile(v, "linear").alias(q) for q, v in QUANTILES.items()]
                 + [pl.col("ms").mean().alias("mean"), pl.len().alias("n")])
            .sort("phase", "target"))


def _verdict(value: float | None, target: float, threshold: float, better: str) -> str:
    if value is None:
        return "n/a"
    meets = (lambda limit: value < limit) if better == "lower" else (lambda limit: value > limit)
    return "pass (target)" if meets(target) else "pass (threshold)" if meets(threshold) else "fail"


def success_table(summary: dict, gateway_cpu_pct: float | None, machine: str, baseline: dict | None = None) -> pl.DataFrame:
    """The seed's criteria for one target's overall summary (usually the tunnel), with pass/fail."""
    total = summary.get("total_ms", {})
    measured = [total.get("p50"), total.get("p95"), total.get("p99"),
                100 * summary["error_rate"] if "error_rate" in summary else None,
                summary.get("throughput_rps"), gateway_cpu_pct]
    base_total = (baseline or {}).get("total_ms", {})
    base = [base_total.get("p50"), base_total.get("p95"), base_total.get("p99"),
            100 * baseline["error_rate"] if baseline and "error_rate" in baseline else None,
            (baseline or {}).get("throughput_rps"), None]
    rows = []
    for (metric, target, threshold, better), value, direct in zip(SEED_CRITERIA, measured, base):
        rows.append({"metric": metric, "target": target, "threshold": threshold, "measured": value,
                     "direct": direct, "result": _verdict(value, target, threshold, better), "machine": machine})
    return pl.DataFrame(rows, schema_overrides={"measured": pl.Float64, "direct": pl.Float64})
