"""The browser notebook: how long the gateway's page takes to stream a dataset into DuckDB-WASM, and what the
browser holds, through the tunnel against the same endpoint on the direct server.

Debian's Chromium runs headless, driven by Playwright (`executable_path`: Playwright cannot fetch its own
browsers here). Each load is a fresh browser context: open /ui/, list the datasets, load one, run a query.
The load time is the page's own (from its fetch to the rows counted in DuckDB-WASM); memory is the unique set
size (USS) of every Chromium process after the load, so pages shared between processes count once.
"""

from __future__ import annotations

import re
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from ..dataset import dataset_folder
from ..params import RowsResult, RunParams
from ..servers.runner import Cluster, machine_info

QUERY = "SELECT id % 10 AS k, count(*) AS n, sum(amount) AS total FROM sales GROUP BY 1 ORDER BY 1"


@dataclass
class BrowserParams(RunParams):
    """The browser notebook's parameters (parameters/browser.yaml names only what differs)."""

    RUN_PREFIX = "browser"

    rows: int = 1_000_000  # the seed's table: about 50 MB of Arrow IPC
    repetitions: int = 3   # loads per path, each in a fresh browser context
    screenshot: str = ""   # a path: save the page after the tunnel's first load there (docs/ui.png)

    def __post_init__(self) -> None:
        from ...config import ConfigError

        if self.rows < 1 or self.repetitions < 1:
            raise ConfigError("rows and repetitions must be at least 1")
        super().__post_init__()


class BrowserResult(RowsResult):
    """The browser notebook's measurements, a row each."""


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed ('make report' installs it)")
    return path


def chromium_uss_bytes() -> int:
    """Unique memory of every Chromium process this process started (through Playwright's driver)."""
    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("chrom"):
                total += proc.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_browser(params: BrowserParams, progress: Callable[[str], None] = lambda _: None) -> BrowserResult:
    """Run the loads; in a thread of its own, since Playwright's sync API refuses to run where an asyncio loop
    runs (a notebook's kernel)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="browser") as pool:
        return pool.submit(_run_browser, params, progress).result()


def _run_browser(params: BrowserParams, progress: Callable[[str], None]) -> BrowserResult:
    from playwright.sync_api import sync_playwright

    from ...config import make_tenants
    from ...http_arrow import default_vendor_dir

    if default_vendor_dir() is None:
        raise RuntimeError("the page's JavaScript packages are not installed: 'npm ci --prefix ui'")
    folder = dataset_folder(params.data_dir, params.rows)
    tenants = make_tenants(1)
    token = next(iter(tenants.values())).client_token
    result = BrowserResult(params, machine=machine_info())
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with Cluster(out / "cluster", tenants, folder, delay_ms="0") as cluster, sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            origins = {"tunnel": f"http://{cluster.host}:{cluster.gateway.ready['http_port']}",
                       "direct": f"http://{cluster.host}:{cluster.components['direct'].ready['http_port']}"}
            for run in range(params.repetitions):
                for path, origin in origins.items():
                    context = chromium.new_context(viewport={"width": 1000, "height": 900})
                    try:
                        page = context.new_page()
                        before = chromium_uss_bytes()
                        seconds, rows = _load(page, origin, token)
                        result.rows.append({"path": path, "run": run, "load_s": seconds, "rows": rows,
                                            "browser_uss_mb": chromium_uss_bytes() / 1e6,
                                            "added_uss_mb": (chromium_uss_bytes() - before) / 1e6})
                        progress(f"{path:6} run {run}: {rows:,} rows in {seconds:.2f} s, browser "
                                 f"{result.rows[-1]['browser_uss_mb']:.0f} MB")
                        if params.screenshot and path == "tunnel" and run == 0:
                            page.screenshot(path=params.screenshot, full_page=True)
                    finally:
                        context.close()
        finally:
            chromium.close()
    return result


def _load(page, origin: str, token: str) -> tuple[float, int]:
    """The page's own load time and the rows DuckDB-WASM counted, after a query has run on them."""
    page.goto(f"{origin}/ui/")
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=30_000)
    page.fill("#token", token)
    for button in ("list", "load"):
        page.click(f"#{button}")
        page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=300_000)
        if page.evaluate("document.body.dataset.state") != "done":
            raise RuntimeError(f"the page failed: {page.inner_text('#error')}")
    seconds = float(re.search(r"in ([\d.]+) s", page.inner_text("#seconds")).group(1))
    rows = int(page.inner_text("#rows"))
    page.fill("#sql", QUERY)
    page.click("#run")
    page.wait_for_function("document.body.dataset.state !== 'busy'", timeout=60_000)
    return seconds, rows


def answer(result: BrowserResult) -> str:
    medians = {}
    for path in ("tunnel", "direct"):
        runs = [r for r in result.rows if r["path"] == path]
        if runs:
            medians[path] = (statistics.median(r["load_s"] for r in runs),
                             statistics.median(r["browser_uss_mb"] for r in runs), runs[0]["rows"])
    if len(medians) < 2:
        return "**Answer:** a path is missing."
    (t, tm, rows), (d, dm, _) = medians["tunnel"], medians["direct"]
    return (f"**Answer:** the page loads {rows:,} rows into DuckDB-WASM through the tunnel in {t:.2f} s against "
            f"{d:.2f} s from the direct server ({t / d:.2f}×, medians); the browser holds {tm:.0f} MB against "
            f"{dm:.0f} MB (unique memory of every Chromium process).")
