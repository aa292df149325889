"""What every experiment's parameters share: where a run's files go, and reading them from parameters/*.yaml."""

from __future__ import annotations

import datetime as dt
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import params_from_yaml, project_path


@dataclass
class RunParams:
    """Base of each experiment's parameters (the notebook's parameters cell, the YAML file's keys)."""

    RUN_PREFIX: typing.ClassVar[str] = "run"

    run_name: str = ""          # empty: <RUN_PREFIX>-<time>
    output_root: str = "outputs"
    data_dir: str = "outputs/data"

    def __post_init__(self) -> None:
        if not self.run_name:
            self.run_name = f"{self.RUN_PREFIX}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides):
        return params_from_yaml(cls, path, **overrides)

    @property
    def out_dir(self) -> Path:
        return project_path(self.output_root) / self.run_name


@dataclass
class RowsResult:
    """An experiment's measurements as rows (one dict each), with its parameters and the machine."""

    params: RunParams
    rows: list[dict] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir

    def table(self):
        import polars as pl

        return pl.DataFrame(self.rows)
