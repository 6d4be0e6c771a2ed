"""Launching processes: a ``torchrun`` command line run from a notebook, with the workbook's environment.

Notebook 05 writes the ``torchrun`` command line that starts its workers
(``workers/replicas.py``, ``workers/tensor_parallel.py``) in its own cells and
hands it to :func:`launch`, which only adds what every launch needs: a fresh
set of processes (no fork of the kernel), the repository on ``PYTHONPATH``,
NVLink multicast off, a timeout, and the processes' own error lines when they
fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (``workers/`` and ``gpu-reference/`` live here)."""

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Environment for anything launched on several GPUs: NVLink multicast off (NCCL, PyTorch, NVSHMEM).

On the shared multi-GPU machines the workbook is tested on, a program that uses
NVLink multicast can put the host's GPUs out of service; these settings cost
nothing on other machines. ``workbook.sh`` exports the same three.
"""


class LaunchError(RuntimeError):
    """A launched group of processes failed; the message holds the end of its output. Notebook 05."""


def _launch_env(extra: dict | None = None) -> dict:
    """A copy of ``os.environ`` with :data:`SAFE_ENV`, the repository on ``PYTHONPATH`` and ``extra``."""
    env = dict(os.environ)
    env.update(SAFE_ENV)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def launch(command: list, timeout: float = 900, extra_env: dict | None = None,
           retries: int = 1) -> subprocess.CompletedProcess:
    """Run a command line such as ``["torchrun", "--nproc_per_node=2", "workers/replicas.py", ...]``.

    ``"torchrun"`` as the first word runs this Python's launcher
    (``python -m torch.distributed.run``), so the processes use the kernel's
    own environment even when the ``torchrun`` script is not on ``PATH``.
    Processes start fresh in the repository root with :func:`_launch_env`.
    Used by notebook 05 and the GPU reference benchmark.

    Args:
        command: the words of the command line (numbers are turned into text).
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
        ValueError: an empty command.
    """
    words = [str(w) for w in command]
    if not words:
        raise ValueError("launch needs a command line, e.g. ['torchrun', '--nproc_per_node=2', 'workers/replicas.py']")
    argv = [sys.executable, "-m", "torch.distributed.run", *words[1:]] if words[0] == "torchrun" else words
    name = next((Path(w).name for w in words if w.endswith(".py")), words[0])
    for attempt in range(retries + 1):
        try:
            done = subprocess.run(argv, cwd=ROOT, env=_launch_env(extra_env), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LaunchError(f"{name} ran past {timeout:.0f} s") from e
        if done.returncode == 0:
            return done
        lines = (done.stdout + "\n" + done.stderr).strip().splitlines()
        # the processes' own messages ("rank 0: expected ...", "ValueError: ...", a C++ abort) before the summary
        own = list(dict.fromkeys(l for l in lines if re.match(
            r"^(rank \d+:|[A-Za-z]*(Error|Exception): |terminate called|\s*what\(\):)", l)))
        message = f"{name} exited with {done.returncode}:\n" + "\n".join(own[:5] + ["..."] + lines[-15:])
        killed = re.search(r"exitcode\s*:\s*-\d+", done.stdout + done.stderr)
        if not killed or attempt == retries:
            raise LaunchError(message)
        print(f"warning: {message}\n(killed by a signal: starting the group once more)", file=sys.stderr)
    raise AssertionError("unreachable")
