"""The report's charts: altair over polars frames, each saved as HTML and PNG."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

PHASE_ORDER = ["connect_ms", "metadata_ms", "data_transfer_ms", "total_ms"]

# A seed run has 2,000 requests × 4 phases; the charts are saved as files, so the inline limit does not apply.
alt.data_transformers.disable_max_rows()


def save(chart: alt.TopLevelMixin, out_dir: Path, name: str) -> list[Path]:
    """Write NAME.html and NAME.png beside each other."""
    charts = out_dir / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    paths = [charts / f"{name}.html", charts / f"{name}.png"]
    chart.save(paths[0])
    chart.save(paths[1], scale_factor=1.5)
    return paths


def latency_by_tenant_and_phase(requests: pl.DataFrame, machine: str) -> alt.FacetChart:
    ok = requests.filter(pl.col("status") == "success")
    long = ok.unpivot(index=["tenant_id", "target"], on=PHASE_ORDER, variable_name="phase", value_name="ms")
    return (alt.Chart(long)
            .mark_boxplot(extent="min-max", size=14)
            .encode(x=alt.X("tenant_id:N", title=None), xOffset="target:N",
                    y=alt.Y("ms:Q", title="ms", scale=alt.Scale(zero=False)),
                    color=alt.Color("target:N", title="path"))
            .properties(width=260, height=200)
            .facet(facet=alt.Facet("phase:N", sort=PHASE_ORDER, title=None), columns=2,
                   title=f"Latency per tenant and phase, tunnel vs direct ({machine})")
            .resolve_scale(y="independent"))


def latency_distribution(requests: pl.DataFrame, machine: str) -> alt.Chart:
    ok = requests.filter(pl.col("status") == "success")
    return (alt.Chart(ok, title=f"Total latency distribution ({machine})")
            .transform_density("total_ms", groupby=["target"], as_=["total_ms", "density"])
            .mark_area(opacity=0.5)
            .encode(x=alt.X("total_ms:Q", title="total ms"), y=alt.Y("density:Q", stack=None), color="target:N")
            .properties(width=600, height=220))


def throughput_over_time(requests: pl.DataFrame, machine: str) -> alt.Chart:
    done = (requests.filter(pl.col("status") == "success")
            .with_columns((pl.col("ended_s") - pl.col("started_s").min().over("target", "repetition"))
                          .floor().alias("second"))
            .group_by("target", "repetition", "second").agg(pl.len().alias("requests_per_s"))
            .sort("second"))
    return (alt.Chart(done, title=f"Completed requests per second ({machine})")
            .mark_line(point=True)
            .encode(x=alt.X("second:Q", title="seconds since the load started"), y="requests_per_s:Q",
                    color="target:N", detail="repetition:N")
            .properties(width=600, height=220))


def process_resources(samples: pl.DataFrame, machine: str) -> alt.VConcatChart:
    base = alt.Chart(samples).encode(x=alt.X("t_s:Q", title="seconds"), color=alt.Color("process:N"))
    cpu = base.mark_line().encode(y=alt.Y("cpu_percent:Q", title="CPU % (100 = one core)")).properties(
        width=600, height=180, title=f"CPU per process ({machine})")
    rss = base.mark_line().encode(y=alt.Y("rss_mb:Q", title="RSS MiB")).properties(
        width=600, height=180, title="Memory (RSS) per process")
    return alt.vconcat(cpu, rss)


def overhead_by_phase(requests: pl.DataFrame, machine: str) -> alt.Chart:
    tunnel = requests.filter((pl.col("status") == "success") & (pl.col("target") != "direct"))
    long = tunnel.unpivot(index=["target"], on=["metadata_overhead_ms", "data_transfer_overhead_ms",
                                                "websocket_overhead_ms"], variable_name="phase", value_name="ms")
    return (alt.Chart(long, title=f"Tunnel overhead vs the direct median, per request ({machine})")
            .mark_boxplot(extent="min-max")
            .encode(x=alt.X("phase:N", title=None), y=alt.Y("ms:Q", title="ms over direct median"),
                    color="target:N", xOffset="target:N")
            .properties(width=500, height=220))


def all_charts(requests: pl.DataFrame, samples: pl.DataFrame, machine: str) -> dict[str, alt.TopLevelMixin]:
    return {
        "latency_by_tenant_and_phase": latency_by_tenant_and_phase(requests, machine),
        "latency_distribution": latency_distribution(requests, machine),
        "overhead_by_phase": overhead_by_phase(requests, machine),
        "throughput_over_time": throughput_over_time(requests, machine),
        "process_resources": process_resources(samples, machine),
    }
