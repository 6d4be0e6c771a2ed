"""The GPU reference: results measured on the workbook's GPU machines, one folder per hardware tier.

``gpu-reference/<tier>/results.json`` holds what that tier's benchmark
measured (hardware, versions, figures); notebooks that quote GPU figures read
them from here, never from prose. Every figure is read as a record with the
limit it is measured against (:func:`records`). Notebooks 06 and 07.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .launch import ROOT
from .measure import rate_text
from .shapes import SHAPES
from .text import say

REFERENCE = ROOT / "gpu-reference"
"""The folder of the GPU reference tiers."""

TIERS = ("one-gpu", "two-gpu")
"""Tier folders under :data:`REFERENCE`."""

TIER_GPUS = {"one-gpu": 1, "two-gpu": 2}
"""How many GPUs each tier was measured on."""

SPEC_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}
"""Memory bandwidth in bytes/s from the vendor's specification (sources in ``docs/published-figures.md``):
the ceiling of a file that measured no bandwidth of its own."""


def reference_results(tier: str = "two-gpu", path: str | os.PathLike | None = None) -> dict:
    """Read a tier's committed results (``gpu-reference/<tier>/results.json``), or the file at ``path``.

    Returns:
        The parsed JSON: ``hardware`` (the :func:`helpers.hardware.report` of
        the GPU machine), ``versions``, ``model`` (the random-weight shape), and
        the measured sections; ``gpu-reference/tools/gpu_bench.py`` documents them.

    Raises:
        ValueError: an unknown tier (the message lists :data:`TIERS`).
        FileNotFoundError: no results file; the message says how to make one.

    Used by :func:`read_reference` and the tests.
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


_OLD_SECTIONS = {"single": ("one GPU", "bf16", "rows", 1), "split": ("split", "bf16", "rows", None),
                 "split_nf4": ("split", "nf4", "rows", None), "replicas": ("replicas", "bf16", "bench", None),
                 "tensor_parallel": ("tensor parallel", "bf16", "bench", None),
                 "offload": ("cpu offload", "bf16", "rows", 1)}


def _old_limit(res: dict, rec: dict) -> float:
    """The limit of a record of an older file, which recorded none: an upper bound on its total tokens/s.

    A decode step reads the weights, the input embedding as one row a sequence, at the GPU's specified
    bandwidth; the KV cache is left out, so the bytes are a lower bound and the limit an upper bound.
    """
    shape = SHAPES[res["model"]["shape"]]
    bw = SPEC_BANDWIDTH[res["hardware"]["gpus"][0][0]]
    row = shape["hidden_size"] * 2  # one bf16 row of the embedding
    weights = sum(res["split_nf4"]["mem_after_load_bytes"]) if rec["format"] == "nf4" else res["model"]["weight_bytes"]

    def step(batch: int) -> int:
        return weights - shape["vocab_size"] * row + batch * row

    b, n = rec["batch"], rec["gpus"]
    if rec["path"] == "replicas":  # each GPU reads every weight for its own share; the largest share sets the pace
        return b * bw / step(-(-b // n))
    if rec["path"] == "tensor parallel":  # each GPU reads its 1/n of the weights for every sequence
        return n * b * bw / step(b)
    if rec["path"] == "cpu offload":  # offloaded bytes cross at most at the pinned copy rate
        off = rec["bytes_offloaded"]
        return 1 / ((step(1) - off) / bw + off / (res["h2d"]["pinned_GBps"] * 1e9))
    return b * bw / step(b)  # one GPU, or a split: the same bytes, one GPU at a time


def records(res: dict) -> list[dict]:
    """Every speed measurement of a results file as a record, each with the limit it is measured against.

    A record holds ``shape``, ``format``, ``path`` ("one GPU", "split",
    "replicas", "tensor parallel", "cpu offload"), ``batch`` (sequences in
    flight over all GPUs), ``gpus``, ``tokens_per_s`` (all their new tokens
    per second), ``spread`` (the lowest and highest total tokens/s of its
    repeats, where the file recorded them), ``limit_tokens_per_s``,
    ``limit_from`` and ``peak_bytes_per_gpu``. A file made before records
    existed (one section per method, as the two-GPU tier's) is read into the
    same form.

    The limit is the file's own where it has one (``limit_from`` "measured": the copy rate measured in
    the same run). A CPU-offload record without one gets the same measured rate for the bytes left on
    the GPU plus the pinned host-to-device copy rate the file measured for the offloaded bytes. A file
    that measured no bandwidth gets the GPU's specified one (:data:`SPEC_BANDWIDTH`, ``limit_from``
    "specified"). Every limit is an upper bound. Notebooks 06 and 07, ``tests/test_stored_rates.py``.
    """
    if "records" in res:
        out = []
        for r in res["records"]:
            r = {**r, "limit_from": "measured"}
            if r.get("limit_tokens_per_s") is None and r["path"] == "cpu offload":
                bw, off = res["bandwidth"]["GBps"] * 1e9, r["bytes_offloaded"]
                r["limit_tokens_per_s"] = 1 / ((res["model"]["step_bytes_batch_1"] - off) / bw
                                               + off / (res["h2d"]["pinned_GBps"] * 1e9))
            out.append(r)
        return out
    n, out = len(res["hardware"]["gpus"]), []
    for key, (path, fmt, rows, gpus) in _OLD_SECTIONS.items():
        section = res.get(key, {})
        peak = section.get("peak_bytes") or [r.get("peak_bytes") for r in section.get("per_rank", [])]  # whole run
        for r in section.get(rows, []):
            rec = {**r, "shape": res["model"]["shape"], "format": fmt, "path": path, "gpus": gpus or n,
                   "batch": r.get("batch", r.get("batch_total")), "tokens_per_s": r["total_tokens_per_s"],
                   "peak_bytes_per_gpu": [p["peak_bytes"] for p in r["per_rank"]] if "per_rank" in r else peak,
                   "limit_from": "specified"}
            rec["limit_tokens_per_s"] = _old_limit(res, rec)
            out.append(rec)
    return out


def _matching_tier(n_gpus: int) -> str:
    """The tier whose figures a machine with ``n_gpus`` GPUs quotes: two-gpu from two GPUs up, else one-gpu."""
    return "two-gpu" if n_gpus >= 2 else "one-gpu"


def _configuration(res: dict, r: dict) -> tuple:
    """What a record ran, as far as its speed goes: GPU model, shape, format, batch and the work on each GPU.

    The model whole on one GPU, ``generate`` on the whole batch, is one configuration whether the record is
    "one GPU", a single replica (``gpus`` 1: the same call in a process of its own) or "cpu offload" with no
    layer on the CPU (its map puts every module on GPU 0, so transformers adds no hooks).
    """
    whole = r["path"] == "one GPU" or (r["path"] == "replicas" and r["gpus"] == 1) or (
        r["path"] == "cpu offload" and r.get("layers_on_cpu") == 0)
    work = ("one GPU", 1, 0) if whole else (r["path"], r["gpus"], r.get("layers_on_cpu"))
    return (res["hardware"]["gpus"][0][0], r["shape"], r["format"], r["batch"], work)


def same_configuration(files: dict[str, dict]) -> dict:
    """The noise of the GPU reference: how far apart two runs of the same configuration came out.

    ``files`` is ``{tier: results}``, each with its ``records`` (:func:`records`). Two figures are of the same
    configuration when they ran the same shape, format and batch on the same GPU model, doing the same work on
    each GPU (the model whole on one GPU is one configuration, whether timed as "one GPU", as a single replica
    or as "cpu offload" with no layer on the CPU); they may differ in the number of new tokens timed and in
    their place in the run. Where the files recorded no spread of repeats, this is the only measure of
    their noise.

    Returns ``{"bound": the largest ratio, highest over lowest tokens/s, of any configuration measured more than
    once (None where none was), "configurations": [{"configuration": "one GPU, bf16, batch 16", "figures":
    [(tier, record), ...], "ratio": ...}, ...], each measured more than once, largest ratio first}``.
    :func:`read_reference` gives every record without a spread this bound as ``noise_bound``, which
    :func:`helpers.measure.compare_rates` reads: a ratio of two such figures inside ``[1 / bound, bound]``
    claims no difference, one outside does. With the committed files the bound is 1.90 (one GPU, batch 16,
    in the one-GPU and the two-GPU files).
    Notebooks 06 and 07, ``tests/test_stored_rates.py``.
    """
    groups: dict[tuple, list] = {}
    for name, res in files.items():
        for r in res["records"]:
            groups.setdefault(_configuration(res, r), []).append((name, r))
    twice = []
    for (_, _, fmt, batch, (path, gpus, on_cpu)), figures in groups.items():
        if len(figures) > 1:
            rates = [r["tokens_per_s"] for _, r in figures]
            what = (path if path == "one GPU" else f"cpu offload, {on_cpu} layers on the CPU" if on_cpu is not None
                    else f"{path} on {gpus} GPUs")
            twice.append({"configuration": f"{what}, {fmt}, batch {batch}", "figures": figures,
                          "ratio": max(rates) / min(rates)})
    twice.sort(key=lambda c: -c["ratio"])
    return {"bound": twice[0]["ratio"] if twice else None, "configurations": twice}


def _read_tier(name: str) -> dict:
    """One tier's results, checked against its folder, with ``records`` (each with its ``rate``), ``rows`` and
    ``other_files`` (as :func:`read_reference` documents)."""
    res = reference_results(name)
    hw = res["hardware"]
    if res.get("tier", name) != name or len(hw["gpus"]) != TIER_GPUS[name]:
        raise ValueError(f"gpu-reference/{name}/results.json says tier {res.get('tier')!r}, {len(hw['gpus'])} GPU(s)")
    res["records"] = records(res)
    res["rows"] = {}
    for r in res["records"]:
        r["rate"] = rate_text(r["tokens_per_s"], r["limit_tokens_per_s"], r.get("spread"))
        key = r["layers_on_cpu"] if r["path"] == "cpu offload" else r["batch"]  # offload: all at batch 1
        res["rows"].setdefault((r["path"], r["format"]), {})[key] = r
    res["other_files"] = {p.name: json.loads(p.read_text()) for p in sorted((REFERENCE / name).glob("*.json"))
                          if p.name != "results.json"}
    return res


def read_reference(n_gpus: int) -> dict:
    """Read the GPU reference a machine with ``n_gpus`` GPUs quotes, and print where its figures come from.

    Returns ``{tier: results}``: the tier matching the machine first (two-gpu from two GPUs up, else
    one-gpu: a machine without a GPU quotes the GPU box a learner most often has), then the two-GPU tier
    for what needs two GPUs (one entry when they are the same). Each results dict gets

    - ``records``: today's form, each with its limit (:func:`records`) and ``rate``, its tokens/s as
      :func:`helpers.measure.rate_text` prints it (with its share of the limit, and the spread where recorded);
      a record without a spread also gets ``noise_bound`` (below);
    - ``rows``: ``{(path, format): {batch: record}}``, e.g. ``res["rows"]["split", "bf16"][16]`` (for
      "cpu offload", all at batch 1, ``{decoder layers on the CPU: record}``);
    - ``other_files``: the tier folder's other JSON files by name (e.g. ``tp-system-transformers.json``);
    - ``noise``: :func:`same_configuration` over every tier's file (all of them, not only those returned):
      the largest ratio between two runs of the same configuration, the bound that
      :func:`helpers.measure.compare_rates` judges figures without a spread by.

    Prints each file's hardware, versions, model and where its limits come from, then the noise bound.

    Raises:
        ValueError: a file whose ``tier`` entry or GPU count is not its folder's.
        helpers.measure.MeasurementError: a figure above its limit (it cannot be true).
        FileNotFoundError: as :func:`reference_results`. Notebooks 06 and 07.
    """
    tier = _matching_tier(n_gpus)
    every = {name: _read_tier(name) for name in dict.fromkeys([tier, "two-gpu", *TIERS])
             if name in (tier, "two-gpu") or (REFERENCE / name / "results.json").is_file()}
    files = {name: every[name] for name in dict.fromkeys([tier, "two-gpu"])}
    noise = same_configuration(every)
    for res in every.values():
        res["noise"] = noise
        for r in res["records"]:
            if not r.get("spread") and noise["bound"]:
                r["noise_bound"] = noise["bound"]
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
        if "bandwidth" in res:
            spreads = "recorded" if all(r.get("spread") for r in res["records"]) else "not recorded"
            say("  limits: the tokens/s at which every decode step reads its bytes (weights, KV cache) at the "
                f"device-to-device copy rate measured in the same run, {res['bandwidth']['GBps']:.0f} GB/s; "
                f"spreads of repeats: {spreads}")
        else:
            say("  an older file: no bandwidth measured, no spread of repeats recorded; limits use the "
                f"{hw['gpus'][0][0]}'s specified {SPEC_BANDWIDTH[hw['gpus'][0][0]] / 1e12:.1f} TB/s "
                "(docs/published-figures.md), an upper bound")
    if noise["bound"]:
        top, b = noise["configurations"][0], noise["bound"]
        runs = ", ".join(f"[{t}] {'one replica' if r['path'] == 'replicas' else r['path']}" for t, r in top["figures"])
        say(f"Noise: two runs of the same configuration differed by up to {b:.2f}x in gpu-reference/*/results.json "
            f"({top['configuration']}, timed as {runs}). A ratio of figures without a recorded spread is a "
            f"difference only outside {1 / b:.2f}x to {b:.2f}x.")
    return files


_SPEED_FOLDERS = {"cpu": ROOT / "cpu-reference" / "speed", "one-gpu": REFERENCE / "one-gpu" / "speed"}
"""Where each tier's committed speed benchmark lies (``./workbook.sh bench`` writes it into ``build/bench/``)."""


def speed_results(tier: str) -> dict | None:
    """Read a tier's committed speed benchmark, ``<tier folder>/speed/speed.json``, or None where none is committed.

    Tiers: ``"cpu"`` (``cpu-reference/speed/``: the 2-core CPU machine, the bundled model in bf16) and
    ``"one-gpu"`` (``gpu-reference/one-gpu/speed/``: one GPU, RANDOM-weight ``llama-1b`` and ``llama-3.1-8b``
    shapes). The file is what ``tools/bench.py`` wrote (its docstring documents every field): ``hardware``,
    ``versions``, ``bandwidth`` (bytes/s, read plus written, measured in the same run), ``matmul`` (FLOP/s),
    and ``records``, each with ``shape``, ``format``, ``path``, ``batch``, ``tokens_per_s`` (total over the
    batch), ``limit_tokens_per_s`` (total, from that bandwidth) and ``spread`` (lowest and highest total
    tokens/s of its repeats); then ``prefill`` (seconds to the first token beside the FLOP floor), ``load``
    (seconds), ``compile``, ``refused`` and ``skipped`` (each with its reason). Where it is None, make it with
    ``./workbook.sh bench`` on a machine of that tier and commit ``build/bench/`` into the folder.

    Raises:
        ValueError: an unknown tier (the message lists the known ones).

    Notebook 04; ``tests/test_stored_rates.py`` checks every record of every committed file.
    """
    if tier not in _SPEED_FOLDERS:
        raise ValueError(f"unknown speed benchmark tier {tier!r}; choose one of {', '.join(_SPEED_FOLDERS)}")
    path = _SPEED_FOLDERS[tier] / "speed.json"
    return json.loads(path.read_text()) if path.is_file() else None
