"""The house's rules: the product installs and runs without the workbook (the dependency arrow points one way,
also inside functions), and no two modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import poc

ROOT = Path(poc.__file__).parent
PROJECT = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in ROOT.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """Every module of the project a file imports, anywhere in it (inside functions too), relative imports
    resolved; `from package import name` counts the module `package.name` when there is one."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                found.add(name)
    return found


def third_party(path: Path) -> set[str]:
    """The top-level names of what a file imports from outside the project, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"poc"}


def is_product(module: str) -> bool:
    return not module.startswith("poc.workbook")


def workbook_only_imports() -> set[str]:
    """Import names of the workbook's dependencies (pyproject.toml's [workbook]), as installed."""
    wanted = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower().replace("_", "-")
              for d in PROJECT["optional-dependencies"]["workbook"]}
    return {top for top, dists in importlib.metadata.packages_distributions().items()
            if {d.lower().replace("_", "-") for d in dists} & wanted}


def test_the_product_imports_nothing_of_the_workbook_anywhere():
    for module, path in MODULES.items():
        if is_product(module):
            bad = sorted(name for name in imported(path) if not is_product(name))
            assert not bad, f"{module} imports {bad}"


def test_the_product_imports_no_dependency_of_the_workbook():
    workbook_only = workbook_only_imports()
    assert {"polars", "altair", "papermill", "psutil"} <= workbook_only  # the list is read, not empty
    for module, path in MODULES.items():
        if is_product(module):
            assert not third_party(path) & workbook_only, f"{module} imports {third_party(path) & workbook_only}"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_counting_imports_inside_functions():
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    # a package's __init__ only gathers its modules' names: an edge to it is not a dependency of its own
    graph = {m: {d for d in imported(p) if d not in packages} for m, p in MODULES.items()}
    assert circles(graph) == []


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_product_dependencies_leave_the_workbook_out():
    product = {d.split(">")[0].split("=")[0].split("[")[0].lower() for d in PROJECT["dependencies"]}
    assert not product & {"polars", "altair", "papermill", "jupyterlab", "psutil", "numpy", "vl-convert-python"}
    assert "uvloop" not in product  # measured, not adopted: an extra (docs/results.md)
    assert any(d.startswith("poc[") and "workbook" in d and "uvloop" in d
               for d in PROJECT["optional-dependencies"]["test"])


def test_the_workbook_adds_its_commands_through_entry_points():
    commands = {e.name for e in importlib.metadata.entry_points(group="poc.commands")}
    assert {"report", "bench", "relay", "soak", "swarm", "load", "dataset"} <= commands
    from poc.cli import build_parser

    parser = build_parser()
    assert parser.unavailable == {}  # the workbook is installed here: all its commands are listed


# Modules that speak Flight to clients: they may make Flight (and Arrow) errors. Everything below them raises
# the project's own (poc.errors), mapped once by poc.flight_errors at the handlers.
SPEAKS_FLIGHT = {"poc.auth", "poc.direct", "poc.flight_actions", "poc.flight_errors", "poc.gateway.flight_server", "poc.http_arrow",
                 "poc.sql.service", "poc.sql.patterns"}
FLIGHT_ERROR = re.compile(r"\b(?:flight\.Flight\w*Error|pa\.Arrow\w*(?:Error|Invalid))\(")


def makes_flight_errors(path: Path) -> bool:
    return bool(FLIGHT_ERROR.search(path.read_text()))


def test_flight_errors_are_made_only_where_clients_are_answered():
    product = {m: p for m, p in MODULES.items() if not m.startswith("poc.workbook")}
    assert {m for m, p in product.items() if makes_flight_errors(p)} <= SPEAKS_FLIGHT
    assert makes_flight_errors(MODULES["poc.gateway.flight_server"])  # the rule sees what it looks for


def test_the_gateway_below_its_handlers_raises_the_projects_errors():
    for module in ("poc.gateway.link", "poc.gateway.bridge", "poc.gateway.registry", "poc.gateway.shares",
                   "poc.gateway.arrow_checks", "poc.gateway.cluster"):
        assert "poc.errors" in imported(MODULES[module]), module


def test_a_gateway_loads_nothing_it_never_runs():
    """The imports kept inside functions keep what a gateway never runs out of its memory (architecture.md):
    pyarrow.dataset alone is 18 MB of a gateway's resident set."""
    import subprocess
    import sys

    probe = ("import sys, poc.gateway.app, poc.cli.gateway; print(' '.join(m for m in ('duckdb', 'sqlglot', "
             "'pyarrow.dataset', 'polars', 'adbc_driver_manager', 'redis') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
