"""The GPU reference: results measured on the workbook's GPU machines, one folder per hardware tier.

``gpu-reference/<tier>/results.json`` holds what that tier's benchmark
measured (hardware, versions, figures); notebooks that quote GPU figures read
them from here, never from prose. Notebooks 04 and 05 read the two-GPU tier.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .launch import ROOT

REFERENCE = ROOT / "gpu-reference"
"""The folder of the GPU reference tiers."""

TIERS = ("one-gpu", "two-gpu")
"""Tier folders under :data:`REFERENCE`."""


def reference_results(tier: str = "two-gpu", path: str | os.PathLike | None = None) -> dict:
    """Read a tier's committed results (``gpu-reference/<tier>/results.json``), or the file at ``path``.

    Returns:
        The parsed JSON: ``hardware`` (the :func:`helpers.hardware.report` of
        the GPU machine), ``versions``, ``model`` (the random-weight shape), and
        the measured sections; ``gpu-reference/tools/gpu_bench.py`` documents them.

    Raises:
        ValueError: an unknown tier (the message lists :data:`TIERS`).
        FileNotFoundError: no results file; the message says how to make one.
    """
    if path is None and tier not in TIERS:
        raise ValueError(f"unknown GPU reference tier {tier!r}; choose one of {', '.join(TIERS)}")
    p = Path(path) if path else REFERENCE / tier / "results.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"No GPU reference results at {p}: run `python gpu-reference/tools/gpu_bench.py --out {p}` "
            f"on a machine of that tier (see gpu-reference/README.md)."
        )
    return json.loads(p.read_text())
