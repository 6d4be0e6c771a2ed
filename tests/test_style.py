"""The code passes the project's ruff configuration (pyproject.toml: line length 120, pycodestyle and pyflakes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_passes():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, "ruff check . reports:\n" + done.stdout[-4000:] + done.stderr[-2000:]
