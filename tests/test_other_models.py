"""The main job on checkpoints the workbook does not bundle: every notebook runs end to end on each.

The README invites users to pass their own model (``./workbook.sh run -p MODEL DIR``). Each checkpoint of
``tests/other_models.py`` (RANDOM weights; an untied Qwen2, GPT-2 with its ``Conv1D`` layers, a tied Llama like
the bundled one, Bloom) is built with ``save_pretrained`` and the bundled tokenizer, then the main job's executor
(``tools/execute.py -p MODEL DIR``, as ``./workbook.sh run`` calls it) runs every notebook that reads ``MODEL``
on it. CI runs the cheapest (``llama-tied``); ``WORKBOOK_ALL_MODELS=1`` runs all four.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.other_models import CHEAPEST, SMALL, build

ROOT = Path(__file__).resolve().parent.parent
ALL = os.environ.get("WORKBOOK_ALL_MODELS") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_main_job_runs_on_another_checkpoint(name, tmp_path_factory):
    if name != CHEAPEST and not ALL:
        pytest.skip(f"{name}: WORKBOOK_ALL_MODELS=1 runs the main job on every architecture; CI runs {CHEAPEST}")
    models = tmp_path_factory.mktemp("models")
    path = build(models, name)
    out = ROOT / "build" / f"other-model-{name}"
    notebooks = reading_model()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "execute.py"), "--out", str(out), "-p", "MODEL",
                           str(path), *map(str, notebooks)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    summary = done.stdout[done.stdout.rfind("notebook"):]
    assert done.returncode == 0, f"the main job failed on {name} ({path}):\n{summary}\n{done.stderr[-3000:]}"
    assert summary.count(" ok ") == len(notebooks), summary


def reading_model() -> list[Path]:
    """The notebooks that load the model named by their ``MODEL`` parameter (``resolve_model(MODEL)``).

    A notebook that keeps the parameter but never reads it (09 runs CLIP) gives the same run whatever ``MODEL`` is:
    nbval already runs it once, so this test leaves it out.
    """
    found = [nb for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
             if "resolve_model(MODEL)" in nb.with_suffix(".py").read_text()]
    assert len(found) >= 8, f"only {len(found)} notebooks read MODEL: {found}"
    return found
