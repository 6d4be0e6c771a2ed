"""The notebook executor: a failing cell, a cell past its timeout or a dead kernel is that notebook's failure;
the summary is still printed and no other notebook's outputs are touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def notebook(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# Run {path.stem}"),
                                         nbformat.v4.new_code_cell("print('started')"),
                                         nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return path


def test_timeout_dead_kernel_and_error_are_each_one_notebooks_failure(tmp_path):
    paths = [notebook(tmp_path / "00_sleeps.ipynb", "import time; time.sleep(60)"),
             notebook(tmp_path / "01_dies.ipynb", "import os; os._exit(1)"),
             notebook(tmp_path / "02_raises.ipynb", "raise ValueError('planted')"),
             notebook(tmp_path / "03_fine.ipynb", "print(6 * 7)")]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "execute.py"), "--out", str(out), "--cell-timeout",
                           "5", *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("0")}
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in rows["00_sleeps.ipynb"] and "ran past 5 s" in rows["00_sleeps.ipynb"], rows
    assert "FAILED" in rows["01_dies.ipynb"] and "died" in rows["01_dies.ipynb"], rows
    assert "FAILED" in rows["02_raises.ipynb"] and "planted" in rows["02_raises.ipynb"], rows
    assert " ok " in rows["03_fine.ipynb"], rows
    assert (out / "index.html").is_file(), "the course site is written even when notebooks fail"
    fine = nbformat.read(out / "03_fine.ipynb", as_version=4)
    assert fine.cells[2].outputs[0]["text"] == "42\n"
