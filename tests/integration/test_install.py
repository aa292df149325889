"""`pip install .` brings the product alone: it runs, and the workbook's dependencies stay out."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_product_installs_without_the_workbook(tmp_path):
    env_dir = tmp_path / "slim"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], check=True, timeout=600,
                   cwd=tmp_path)
    gateway_help = subprocess.run([str(python), "-m", "poc", "gateway", "--help"], capture_output=True, text=True,
                                  cwd=tmp_path, timeout=60)
    assert gateway_help.returncode == 0 and "--max-buffered-bytes" in gateway_help.stdout
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                               text=True, cwd=tmp_path, timeout=60).stdout.lower()
    for workbook_only in ("jupyterlab", "papermill", "polars", "altair", "psutil"):
        assert f"{workbook_only}==" not in installed
    bench = subprocess.run([str(python), "-m", "poc", "bench"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=60)
    assert bench.returncode == 2 and "pip install 'poc[workbook]'" in bench.stderr
    listed = subprocess.run([str(python), "-m", "poc", "--help"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60).stdout
    commands = listed.split("COMMAND\n", 1)[-1]
    assert "gateway" in commands and "connector" in commands and "direct" in commands
    for workbook_command in ("report", "bench", "relay", "soak", "swarm", "load", "dataset"):
        assert f"    {workbook_command} " not in commands  # a product-only install does not list them
