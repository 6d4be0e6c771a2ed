"""Boilerplate for several GPUs: launching torchrun, a random-weight checkpoint, the GPU reference results.

The notebook (04) shows the APIs it teaches inline or in the scripts under
``scripts/``; this module only starts processes, builds a checkpoint of random
weights once, and reads the committed GPU reference (``gpu-reference/results.json``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (``scripts/`` and ``gpu-reference/`` live here)."""

REFERENCE = ROOT / "gpu-reference" / "results.json"
"""The committed results of the GPU reference run."""

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Environment for anything launched on several GPUs: NVLink multicast off (NCCL, PyTorch, NVSHMEM).

On the shared two-GPU machines the workbook is tested on, a program that uses
NVLink multicast can put the host's GPUs out of service; these settings cost
nothing on other machines.
"""


class LaunchError(RuntimeError):
    """A launched group of processes failed; the message holds the end of its output."""


def launch_env(extra: dict | None = None) -> dict:
    """A copy of ``os.environ`` with :data:`SAFE_ENV`, the repository on ``PYTHONPATH`` and ``extra``."""
    env = dict(os.environ)
    env.update(SAFE_ENV)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def torchrun(script: str | os.PathLike, nproc: int, args: list[str], timeout: float = 900,
             extra_env: dict | None = None, retries: int = 1) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc script *args``.

    The processes start fresh (no fork of the notebook's kernel), with
    :func:`launch_env`, in the repository root.

    Args:
        script: path of the script (relative paths are taken from the repository root).
        nproc: processes to start (one per GPU, or CPU processes).
        args: the script's own arguments.
        timeout: seconds before the group is killed.
        retries: how often to start the group again when a process was killed by a
            signal (not when the script itself failed). Once, on the 2-core CI
            machine, a gloo process died with SIGABRT at start-up and did not
            reproduce in 20 later runs; the first failure is reported on stderr.

    Returns:
        The ``CompletedProcess`` (stdout and stderr as text).

    Raises:
        LaunchError: a non-zero exit or a timeout; the message starts with the
            processes' own error lines and ends with the last 15 lines of the output.
        ValueError: ``nproc`` < 1.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    for attempt in range(retries + 1):
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=launch_env(extra_env), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LaunchError(f"{Path(script).name} with {nproc} processes ran past {timeout:.0f} s") from e
        if done.returncode == 0:
            return done
        lines = (done.stdout + "\n" + done.stderr).strip().splitlines()
        # the processes' own messages ("rank 0: expected ...", "ValueError: ...", a C++ abort) before the summary
        own = list(dict.fromkeys(l for l in lines if re.match(
            r"^(rank \d+:|[A-Za-z]*(Error|Exception): |terminate called|\s*what\(\):)", l)))
        tail = "\n".join(own[:5] + ["..."] + lines[-15:])
        message = f"{Path(script).name} with {nproc} processes exited with {done.returncode}:\n{tail}"
        killed = re.search(r"exitcode\s*:\s*-\d+", done.stdout + done.stderr)
        if not killed or attempt == retries:
            raise LaunchError(message)
        print(f"warning: {message}\n(killed by a signal: starting the group once more)", file=sys.stderr)
    raise AssertionError("unreachable")


def random_checkpoint(shape: str = "llama-1b", dtype=None, device: str | None = None) -> Path:
    """Build (once) and return a checkpoint of RANDOM weights of a named shape (helpers.shapes).

    It is saved under ``<cache>/random-<shape>-<dtype>`` with a file
    ``RANDOM_WEIGHTS.txt`` saying so; its text is meaningless: use it for
    speed, memory and tensor parallelism only. Seed 0, so every build holds
    the same weights. A later call verifies the folder and returns it.

    Args:
        shape: a name in ``helpers.shapes.SHAPES``.
        dtype: torch dtype of the weights (default bfloat16).
        device: where to draw the weights ("cuda" is much faster for 1B
            parameters; default: cuda if present, else cpu).

    Returns:
        The checkpoint directory (about 2.2 GB for llama-1b in bfloat16).

    Raises:
        ValueError: unknown shape.
        FileExistsError: a folder the workbook did not make stands at that path (left untouched).
        CacheError: the cache cannot be used.
    """
    import shutil
    import tempfile

    import torch

    from .model import CheckpointError, cache_dir, verify_checkpoint
    from .shapes import SHAPES, random_model

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    dtype = dtype or torch.bfloat16
    name = f"random-{shape}-{str(dtype).replace('torch.', '')}"
    root = cache_dir()
    entry = root / name
    if (entry / "RANDOM_WEIGHTS.txt").is_file():
        try:
            return verify_checkpoint(entry)
        except CheckpointError:
            shutil.rmtree(entry)  # ours (it carries our marker) and damaged: rebuild
    elif entry.exists():
        raise FileExistsError(f"{entry} exists but was not made by the workbook; move it away or set WORKBOOK_CACHE.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(shape, dtype=dtype, seed=0, device=device)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        (tmp / "RANDOM_WEIGHTS.txt").write_text(
            f"RANDOM weights (seed 0) of the {shape} shape, built by helpers.multigpu.random_checkpoint.\n"
            "Its text is meaningless: use it for speed, memory and tensor parallelism only.\n")
        tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def reference_results(path: str | os.PathLike | None = None) -> dict:
    """Read the committed GPU reference results (``gpu-reference/results.json``).

    Returns:
        The parsed JSON: ``hardware`` (the helpers.hardware report of the
        GPU machine), ``versions``, ``model`` (the random-weight shape), and the
        measured sections (``single``, ``split``, ``replicas``,
        ``tensor_parallel``, ``offload``, ...); see ``scripts/gpu_bench.py``.

    Raises:
        FileNotFoundError: no results file; the message says how to make one.
    """
    p = Path(path) if path else REFERENCE
    if not p.is_file():
        raise FileNotFoundError(
            f"No GPU reference results at {p.name}: run `python scripts/gpu_bench.py --out {p.name}` "
            f"on a machine with two GPUs (see gpu-reference/README.md)."
        )
    return json.loads(p.read_text())
