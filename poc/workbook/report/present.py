"""How the notebooks show results in the shared report: whole tables with rounded numbers and units, paths
relative to the project, and the answer first."""

from __future__ import annotations

import html
import math
from pathlib import Path

import polars as pl

from ...config import PROJECT_ROOT


def number(value, decimals: int | None = None) -> str:
    """A figure as a reader wants it: thousands separated, three significant digits for fractions, — for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if decimals is None:
            size = abs(value)
            decimals = 0 if size >= 100 or value == int(value) else 1 if size >= 10 else 2 if size >= 0.1 else 3
        return f"{value:,.{decimals}f}"
    return str(value)


def table_html(frame: pl.DataFrame, headers: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> str:
    """Every row and column of `frame` (but `drop`) as an HTML table, headers renamed by `headers` (where the
    units go), numbers through `number`."""
    headers = headers or {}
    columns = [c for c in frame.columns if c not in drop]
    numeric = {c for c in columns if frame.schema[c].is_numeric()}
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style=\"text-align:{'right' if c in numeric else 'left'}\">"
                         f"{html.escape(number(row[c]))}</td>" for c in columns) + "</tr>"
        for row in frame.select(columns).iter_rows(named=True))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def show(frame: pl.DataFrame, headers: dict[str, str] | None = None, drop: tuple[str, ...] = ()):
    """Display `table_html` in a notebook."""
    from IPython.display import HTML, display

    display(HTML(table_html(frame, headers, drop)))


def shown_path(path: str | Path) -> str:
    """`path` relative to the project (no machine paths in what gets shared), else its last two parts."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(Path(*path.parts[-2:]))
