"""`make report`: execute the experiment notebook with papermill, export it to HTML, say where it is."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import asdict
from pathlib import Path

from ...config import PROJECT_ROOT
from ..experiments.seed import ExperimentParams, ExperimentResult

ROOT = PROJECT_ROOT
NOTEBOOKS = ROOT / "notebooks"


PATH_NAMES = {"direct": "direct Flight", "tunnel": "WebSocket tunnel", "flight_tunnel": "Flight tunnel"}


def ratio_lines(result: ExperimentResult) -> list[str]:
    """Plain sentences comparing each tunnel with direct, from figures of the same run."""
    s = result.summaries
    if "direct" not in s or len(s) < 2:
        return ["Only one path was measured; no comparison."]
    d = s["direct"]["overall"]
    lines = []
    for target in [t for t in s if t != "direct"]:
        t = s[target]["overall"]
        for phase in ("metadata_ms", "data_transfer_ms", "total_ms"):
            tp, dp = t.get(phase, {}).get("p50"), d.get(phase, {}).get("p50")
            if tp is not None and dp:
                lines.append(f"{PATH_NAMES[target]}, {phase.removesuffix('_ms').replace('_', ' ')} P50: {tp:,.1f} ms "
                             f"vs direct {dp:,.1f} ms ({tp / dp:.2f}×, {tp - dp:+,.1f} ms)")
        if t.get("throughput_rps") and d.get("throughput_rps"):
            lines.append(f"{PATH_NAMES[target]}, throughput: {t['throughput_rps']:.1f} req/s vs direct {d['throughput_rps']:.1f} "
                         f"req/s ({t['throughput_rps'] / d['throughput_rps']:.2f}×)")
        lines.append(f"{PATH_NAMES[target]}, errors: {t['errors']} + {t['timeouts']} timeouts of {t['requests']} requests "
                     f"(direct: {d['errors']} + {d['timeouts']})")
    return lines


def answer(result: ExperimentResult) -> str:
    """The report's first lines: which path to take, what it costs against direct (same run), and how each
    tunnel fares against the seed's success criteria."""
    s = result.summaries
    direct = s.get("direct", {}).get("overall", {})
    costs = []
    for target in result.tunnel_targets:
        o = s[target]["overall"]
        ratio = (o["throughput_rps"] / direct["throughput_rps"]
                 if o.get("throughput_rps") and direct.get("throughput_rps") else None)
        added = (o["total_ms"]["p50"] - direct["total_ms"]["p50"]
                 if o.get("total_ms", {}).get("p50") is not None and direct.get("total_ms", {}).get("p50") is not None
                 else None)
        verdicts = result.success(target).select("metric", "result").rows()
        costs.append((target, ratio, added, o["errors"] + o["timeouts"], o["requests"], verdicts,
                      _info_added(o, direct), _tenant_spread(s[target])))
    if not costs:
        return "**Answer:** only the direct path was measured; there is nothing to compare."
    best = max(costs, key=lambda c: (c[1] or 0.0, -(c[2] or 0.0)))
    lines = [f"**Answer: take the {PATH_NAMES[best[0]]}.** Measured in one run against direct Flight on the same "
             "machine:"]
    for target, ratio, added, failed, requests, verdicts, info_added, spread in costs:
        passed = sum(1 for _, v in verdicts if v.startswith("pass"))
        fails = [metric for metric, v in verdicts if v == "fail"]
        lines.append(
            f"- {PATH_NAMES[target]}: {'—' if ratio is None else f'{ratio:.2f}×'} the direct throughput, "
            f"{'—' if added is None else f'{added:+,.1f} ms'} at P50, {failed:,} of {requests:,} requests failed; "
            f"seed criteria: {passed} of {len(verdicts)} pass"
            + (f" (fail: {', '.join(fails)})" if fails else "") + "; GetFlightInfo under load "
            f"{'—' if info_added is None else f'{info_added:+,.1f} ms'} over direct at P50 (goal ≤ +20 ms); "
            f"slowest ÷ fastest tenant's P50 {'—' if spread is None else f'{spread:.2f}'} (goal ≤ 1.5)."
            + compression_note(result.compressed_switches.get(target, {})))
    if result.params.source == "postgresql" and result.extraction_ms:
        first = sorted(result.extraction_ms)[len(result.extraction_ms) // 2]
        lines.append(f"- Source: every DoGet read the table from PostgreSQL through ADBC, not from memory, and the "
                     f"seed's simulated 200–250 ms extraction was not added. The extraction measured: a DoGet's "
                     f"first batch after {first:,.0f} ms (P50 of {len(result.extraction_ms)} lone calls to the "
                     "direct server).")
    return "\n".join(lines)


def compression_note(switches: dict[str, int]) -> str:
    """What to say of a path whose connectors' `--compression auto` turned compression on during the run
    (tenant → times): on loopback it should not, and those tenants then compete on other terms (fewer bytes
    through the gateway for the same rows, decompression in it) — the tenant spread is not comparable."""
    if not switches:
        return ""
    named = ", ".join(f"{tenant} ({times}×)" for tenant, times in sorted(switches.items()))
    whose = "connector" if len(switches) == 1 else "connectors"
    return (f" Compression turned on under load by the {whose} of {named} (--compression auto judged the "
            "link wide-area): the tenant spread of this run is not comparable.")


def _info_added(summary: dict, direct: dict) -> float | None:
    """GetFlightInfo P50 under the run's load, this path minus direct (ms)."""
    mine, theirs = summary.get("metadata_ms", {}).get("p50"), direct.get("metadata_ms", {}).get("p50")
    return None if mine is None or theirs is None else mine - theirs


def _tenant_spread(target_summaries: dict) -> float | None:
    """The slowest tenant's P50 total over the fastest's: how evenly the path shares itself (1.0: evenly)."""
    p50s = [t["total_ms"]["p50"] for t in target_summaries.get("tenants", {}).values()
            if t.get("total_ms", {}).get("p50")]
    return max(p50s) / min(p50s) if len(p50s) > 1 else None


def read_params(params_file: str | Path, output_root: str = "outputs"):
    """(the notebook, its parameters) a parameter file names (`notebook:`, default experiment), checked; the
    run is named after the file and the time."""
    import yaml

    from ...config import ConfigError
    from ..experiments.browser import BrowserParams
    from ..experiments.corporate import CorporateParams
    from ..experiments.resilience import ResilienceParams
    from ..experiments.scale import ScaleParams
    from ..experiments.scaleout import ScaleoutParams
    from ..experiments.sql import SqlParams
    from ..experiments.wan import WanParams

    params_file = Path(params_file)
    try:
        doc = yaml.safe_load(params_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read parameter file {params_file}: {exc}") from None
    name = doc.get("notebook", "experiment")
    kinds = {"experiment": ExperimentParams, "resilience": ResilienceParams, "scale": ScaleParams,
             "scaleout": ScaleoutParams, "wan": WanParams, "sql": SqlParams,
             "browser": BrowserParams, "corporate": CorporateParams}
    if name not in kinds:
        raise ConfigError(f"{params_file}: notebook must be one of {sorted(kinds)}, got {name!r}")
    params = kinds[name].from_yaml(params_file, output_root=output_root,
                                   run_name=f"{params_file.stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    return NOTEBOOKS / f"{name}.ipynb", params


def run_report(params_file: str | Path, output_root: str = "outputs") -> Path:
    """Execute the notebook the parameter file names (`notebook:`, default experiment) with its parameters;
    write the executed notebook and report.html to outputs/<params name>-<time>/."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    notebook, params = read_params(params_file, output_root)
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    executed = out / notebook.name
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}  # lists for papermill
    papermill.execute_notebook(str(notebook), str(executed), parameters={"overrides": overrides}, cwd=str(ROOT),
                               kernel_name="python3", progress_bar=sys.stderr.isatty(), log_output=True,
                               stderr_file=sys.stderr)
    shared = nbformat.read(executed, as_version=4)
    for cell in shared.cells:  # progress lines went to the terminal; the shared page keeps results only
        cell["outputs"] = [o for o in cell.get("outputs", []) if o.get("output_type") != "stream"]
    body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(
        shared)  # what gets shared: results, not code (the .ipynb keeps it)
    (out / "report.html").write_text(body)
    return out
