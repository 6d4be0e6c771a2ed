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
from .text import say

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

    Notebooks 04 and 05.
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


def matching_tier(n_gpus: int) -> str:
    """The tier whose figures a machine with ``n_gpus`` GPUs quotes: two-gpu from two GPUs up, else one-gpu.

    A machine without a GPU quotes the one-GPU tier, the GPU box a learner most often has. Notebooks 04 and 05.
    """
    return "two-gpu" if n_gpus >= 2 else "one-gpu"


_OLD_SECTIONS = {"single": ("one GPU", "bf16", "rows", 1), "split": ("split", "bf16", "rows", None),
                 "split_nf4": ("split", "nf4", "rows", None), "replicas": ("replicas", "bf16", "bench", None),
                 "tensor_parallel": ("tensor parallel", "bf16", "bench", None),
                 "offload": ("cpu offload", "bf16", "rows", 1)}


def records(res: dict) -> list[dict]:
    """Every speed measurement of a results file as a record.

    A record holds ``shape``, ``format``, ``path`` ("one GPU", "split",
    "replicas", "tensor parallel", "cpu offload"), ``batch`` (sequences in
    flight over all GPUs), ``gpus``, ``tokens_per_s`` (all their new tokens
    per second), ``limit_tokens_per_s`` (the bandwidth limit measured in the
    same run, or None) and ``peak_bytes_per_gpu``. A file made before records
    existed (one section per method, as the two-GPU tier's) is read into the
    same form, with no limit. Notebooks 04 and 05.
    """
    if "records" in res:
        return res["records"]
    n, out = len(res["hardware"]["gpus"]), []
    for key, (path, fmt, rows, gpus) in _OLD_SECTIONS.items():
        section = res.get(key, {})
        peak = section.get("peak_bytes") or [r.get("peak_bytes") for r in section.get("per_rank", [])]  # whole run
        for r in section.get(rows, []):
            out.append({**r, "shape": res["model"]["shape"], "format": fmt, "path": path, "gpus": gpus or n,
                        "batch": r.get("batch", r.get("batch_total")), "tokens_per_s": r["total_tokens_per_s"],
                        "limit_tokens_per_s": None,
                        "peak_bytes_per_gpu": [p["peak_bytes"] for p in r["per_rank"]] if "per_rank" in r else peak})
    return out


def by_batch(res: dict, path: str, fmt: str = "bf16") -> dict:
    """{batch: record} of one path and format, on the file's model shape (see :func:`records`). Notebooks 04 and 05."""
    return {r["batch"]: r for r in records(res) if r["path"] == path and r["format"] == fmt
            and r.get("shape", res["model"]["shape"]) == res["model"]["shape"]}


def speed(record: dict) -> str:
    """``"574 tokens/s (1.8% of its limit)"``: a record's total tokens/s, with its share of the limit where known. Notebooks 04 and 05."""
    tps, lim = record["tokens_per_s"], record.get("limit_tokens_per_s")
    return f"{tps:.{0 if tps >= 100 else 1}f} tokens/s" + (f" ({tps / lim:.1%} of its limit)" if lim else "")


TIER_GPUS = {"one-gpu": 1, "two-gpu": 2}
"""How many GPUs each tier was measured on."""


def reference_files(n_gpus: int) -> dict:
    """{tier: results} for a machine with ``n_gpus`` GPUs: its matching tier first, and the two-GPU tier for
    what needs two GPUs (one entry when they are the same). Each file must be the tier it is read as.

    Raises:
        ValueError: a file whose ``tier`` entry or GPU count is not its folder's. FileNotFoundError: as
        :func:`reference_results`. Notebooks 04 and 05.
    """
    files = {name: reference_results(name) for name in dict.fromkeys([matching_tier(n_gpus), "two-gpu"])}
    for name, res in files.items():
        in_file = len(res["hardware"]["gpus"])
        if res.get("tier", name) != name or in_file != TIER_GPUS[name]:
            raise ValueError(f"gpu-reference/{name}/results.json says tier {res.get('tier')!r}, {in_file} GPU(s)")
    return files


def print_sources(files: dict, n_gpus: int) -> None:
    """Print which tier's figures this machine quotes, and each file's hardware, versions, model and limit.

    Notebooks 04 and 05 call it before quoting any GPU figure.
    """
    tier = matching_tier(n_gpus)
    here = f"{n_gpus} GPU{'s' * (n_gpus > 1)}" if n_gpus else "no GPU"
    print(f"This machine has {here}: GPU figures come from the {tier} tier"
          + (", the GPU box a learner most often has." if n_gpus == 0 else
             ", which matches it." if n_gpus == TIER_GPUS[tier] else ", the largest tier measured."))
    for name, res in files.items():
        hw = res["hardware"]
        print(f"[{name}] gpu-reference/{name}/results.json: {len(hw['gpus'])} x {hw['gpus'][0][0]} "
              f"({hw['gpus'][0][1]} GiB)")
        say("  " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
        say(f"  {res['model']['label']}, {res['model']['params'] / 1e9:.2f} B parameters, {res['model']['dtype']}; "
            f"{res['new_tokens']} new tokens")
        print("  the limit beside a figure is measured in the same run: the tokens/s at which every decode step\n"
              f"  reads its bytes (weights, KV cache) at the device-to-device copy rate, {res['bandwidth']['GBps']:.0f} GB/s"
              if "bandwidth" in res else "  an older layout: no limit recorded")


def batch_growth(res: dict, path: str = "one GPU") -> tuple[int, int, float, float]:
    """How throughput grew across a file's batch sweep: ``(lo, hi, growth, step)``.

    ``lo`` and ``hi`` are the smallest and largest batch measured on ``path``;
    ``growth`` is tokens/s at ``hi`` over tokens/s at ``lo``; ``step`` is how
    much longer one decoding step took at ``hi`` than at ``lo``
    (``hi / lo / growth``: 1.0 means the larger batch came for free, i.e. the
    GPU was far from saturated). Notebooks 04 and 05.
    """
    rows = by_batch(res, path)
    lo, hi = min(rows), max(rows)
    growth = rows[hi]["tokens_per_s"] / rows[lo]["tokens_per_s"]
    return lo, hi, growth, hi / lo / growth
