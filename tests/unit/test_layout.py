"""The product installs and runs without the workbook: the dependency arrow points one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import poc

ROOT = Path(poc.__file__).parent
WORKBOOK_ONLY = {"numpy", "polars", "altair", "vl_convert", "papermill", "jupyterlab", "ipykernel", "nbconvert",
                 "psutil", "tqdm", "cryptography"}


def imports(path: Path, top_level_only: bool) -> list[str]:
    """Modules imported by a file (relative ones resolved against the package), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def product_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if "workbook" not in p.relative_to(ROOT).parts]


def test_the_product_imports_nothing_of_the_workbook():
    for path in product_files():
        # cli.py reaches the workbook's commands only inside their functions, so the product's start
        top_level_only = path.name == "cli.py"
        for name in imports(path, top_level_only):
            assert not name.startswith("poc.workbook"), f"{path.name} imports {name}"
            assert name.split(".")[0] not in WORKBOOK_ONLY, f"{path.name} imports {name} (a workbook dependency)"


def test_the_product_dependencies_leave_the_workbook_out():
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    product = {d.split(">")[0].split("=")[0].split("[")[0].lower() for d in project["dependencies"]}
    assert not product & {"polars", "altair", "papermill", "jupyterlab", "psutil", "numpy", "vl-convert-python"}
    assert "uvloop" not in product  # measured, not adopted: an extra (docs/results.md)
    assert any(d.startswith("poc[") and "workbook" in d and "uvloop" in d
               for d in project["optional-dependencies"]["test"])
