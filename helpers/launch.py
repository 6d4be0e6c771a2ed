"""Launching processes: a ``torchrun`` command line run from a notebook, with the workbook's environment.

Notebook 07 writes the ``torchrun`` command line that starts its workers
(``workers/replicas.py``, ``workers/tensor_parallel.py``) in its own cells and
hands it to :func:`launch`, which only adds what every launch needs: a fresh
set of processes (no fork of the kernel), the repository on ``PYTHONPATH``,
NVLink multicast off, a timeout, and the processes' own error lines when they
fail.

Nothing a launch starts outlives it. ``torchrun`` starts each worker in a
session of its own (``start_new_session=True`` in
``torch.distributed.elastic.multiprocessing.subprocess_handler``), so killing
``torchrun``'s process group alone would leave the workers running: :func:`start`
puts the command in a session of its own, the processes under it are noted
while it runs, and :func:`stop` ends the group and every one of them (SIGTERM,
then SIGKILL after a grace period). :func:`launch` does that on a timeout, on an
interrupt (the notebook's stop button: ``KeyboardInterrupt``) and after the
command exits; the tests start JupyterLab the same way, and ``helpers.serving.served``
a ``transformers serve`` server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (``workers/`` and ``gpu-reference/`` live here)."""

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Environment for anything launched on several GPUs: NVLink multicast off (NCCL, PyTorch, NVSHMEM).

On the shared multi-GPU machines the workbook is tested on, a program that uses
NVLink multicast can put the host's GPUs out of service; these settings cost
nothing on other machines. ``workbook.sh`` exports the same three.
"""

GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL when :func:`stop` ends a group of processes."""


class LaunchError(RuntimeError):
    """A launched group of processes failed or ran past its timeout. Notebook 07.

    The message starts with the processes' own error lines and ends with the last
    lines they printed; ``stdout`` and ``stderr`` hold everything they printed
    (up to the moment they were stopped, on a timeout).
    """

    def __init__(self, message: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.stdout, self.stderr = stdout, stderr


def launch_env(extra: dict | None = None) -> dict:
    """A copy of ``os.environ`` with :data:`SAFE_ENV`, the repository on ``PYTHONPATH`` and ``extra``.

    What every process a notebook starts gets: :func:`launch`'s and ``helpers.serving.served``'s.
    """
    env = dict(os.environ)
    env.update(SAFE_ENV)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def start(argv: list, **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(argv, **popen_kwargs)`` in a session (and process group) of its own.

    A Ctrl-C in a terminal then reaches only the caller, which ends the group with
    :func:`stop`; the group's id is the process's id.
    """
    return subprocess.Popen([str(w) for w in argv], start_new_session=True, **popen_kwargs)


def descendants(proc: subprocess.Popen, known: dict | None = None) -> dict:
    """``known`` (``{pid: psutil.Process}``) with every process now under ``proc`` added.

    Call it while ``proc`` runs: a process that left its parent's session
    (``torchrun``'s workers, Jupyter's kernels) is found only through its parent.
    Once ``proc`` has exited (and was waited for), its id may belong to another
    process: nothing is added then.
    """
    known = dict(known or {})
    if proc.returncode is None:  # not waited for yet: its id is still its own, even as a zombie
        try:
            for p in psutil.Process(proc.pid).children(recursive=True):
                known.setdefault(p.pid, p)
        except psutil.Error:
            pass
    return known


def stop(proc: subprocess.Popen, known: dict | None = None, grace_s: float = GRACE_S) -> list[int]:
    """End ``proc``'s process group and every process in ``known`` or now under ``proc``.

    SIGTERM first (``torchrun`` then stops its workers, JupyterLab its kernels),
    SIGKILL to whatever is left after ``grace_s`` seconds. A process of ``known``
    whose id now belongs to another process is left alone (psutil checks its
    start time), and the group is signalled only while its id is certainly
    ``proc``'s (``proc`` not yet waited for, or a process of ``known`` still in it).
    Safe to call more than once, and after the processes exited.

    Returns:
        The ids of the processes that were still there after SIGTERM and ``grace_s`` (they got SIGKILL).
    """
    procs = list(descendants(proc, known).values())

    def signal_all(sig: signal.Signals) -> None:
        if proc.returncode is None or any(_in_group(p, proc.pid) for p in procs):
            try:
                os.killpg(proc.pid, sig)  # proc and whatever stayed in its session
            except OSError:
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def left() -> list[int]:
        return [p.pid for p in procs if _alive(p)] + ([proc.pid] if proc.poll() is None else [])

    if not left():
        return []
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = left()
    if killed:
        signal_all(signal.SIGKILL)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(procs, timeout=grace_s)
    return killed


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _in_group(p: psutil.Process, pgid: int) -> bool:
    try:
        return _alive(p) and os.getpgid(p.pid) == pgid
    except OSError:
        return False


def _own_lines(text: str) -> list[str]:
    """The processes' own error lines ("rank 1: ValueError: ...", "ValueError: ...", a C++ abort), in order."""
    return list(dict.fromkeys(line for line in text.splitlines() if re.match(
        r"^(rank \d+:|[A-Za-z.]*(Error|Exception): |terminate called|\s*what\(\):)", line)))


def _report(head: str, stdout: str, stderr: str, last: int = 15) -> str:
    lines = (stdout + "\n" + stderr).strip().splitlines()
    own = _own_lines(stderr + "\n" + stdout)
    return head + "\n" + "\n".join(own[:5] + ["-- the last lines the processes printed:"] + lines[-last:])


def _run(argv: list, env: dict, timeout: float, name: str) -> subprocess.CompletedProcess:
    """Run ``argv`` to its end or ``timeout``; nothing it started is left running when this returns."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe to fill or hold open

        def printed() -> tuple[str, str]:
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
            return texts[0], texts[1]

        proc = start(argv, cwd=ROOT, env=env, stdout=out, stderr=err)
        known: dict = {}
        deadline = time.monotonic() + timeout
        try:
            while True:
                known = descendants(proc, known)
                try:
                    proc.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        stop(proc, known)
                        o, e = printed()
                        raise LaunchError(_report(f"{name} ran past {timeout:.0f} s and was stopped, with every "
                                                  f"process it started; what they printed so far:", o, e, 30), o, e)
        finally:  # also on KeyboardInterrupt (a notebook's stop button) and after a normal exit
            stop_through_interrupts(proc, known)
        o, e = printed()
    return subprocess.CompletedProcess(argv, proc.returncode, o, e)


def stop_through_interrupts(proc: subprocess.Popen, known: dict) -> None:
    """:func:`stop`, carried to its end when the stop button is pressed again meanwhile (then re-raised).

    Used by :func:`launch` and ``helpers.serving.served`` (notebook 07) when they end their processes.
    """
    interrupted = False
    while True:
        try:
            stop(proc, known)
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def launch(command: list, timeout: float = 900, extra_env: dict | None = None,
           retries: int = 1) -> subprocess.CompletedProcess:
    """Run a command line such as ``["torchrun", "--nproc_per_node=2", "workers/replicas.py", ...]``.

    ``"torchrun"`` as the first word runs this Python's launcher
    (``python -m torch.distributed.run``), so the processes use the kernel's
    own environment even when the ``torchrun`` script is not on ``PATH``.
    Processes start fresh in the repository root with :func:`launch_env`, in a
    session of their own; on a timeout or an interrupt every process of the
    launch is stopped (:func:`stop`) before this returns or raises. When one
    worker fails, ``torchrun`` stops the others at once (its elastic agent
    watches them every 0.1 s), so a failure surfaces in seconds, not at the
    timeout, as long as the failed worker exits (no barrier after an error).
    Used by notebook 07 and the GPU reference benchmark.

    Args:
        command: the words of the command line (numbers are turned into text).
        timeout: seconds before the group is stopped.
        extra_env: variables added to the processes' environment.
        retries: how often to start the group again when every failed process was
            killed by a signal (not when a script itself failed). Once, on the
            2-core CI machine, a gloo process died with SIGABRT at start-up and
            did not reproduce in 20 later runs; the first failure is reported on stderr.

    Returns:
        The ``CompletedProcess`` (stdout and stderr as text).

    Raises:
        LaunchError: a non-zero exit or a timeout; the message starts with the
            processes' own error lines and ends with the last lines of the output;
            its ``stdout`` and ``stderr`` hold all they printed.
        ValueError: an empty command.
    """
    words = [str(w) for w in command]
    if not words:
        raise ValueError("launch needs a command line, e.g. ['torchrun', '--nproc_per_node=2', 'workers/replicas.py']")
    argv = [sys.executable, "-m", "torch.distributed.run", *words[1:]] if words[0] == "torchrun" else words
    name = next((Path(w).name for w in words if w.endswith(".py")), words[0])
    for attempt in range(retries + 1):
        done = _run(argv, launch_env(extra_env), timeout, name)
        if done.returncode == 0:
            return done
        message = _report(f"{name} exited with {done.returncode}:", done.stdout, done.stderr)
        # torchrun's summary lists each failed process's "exitcode"; a negative one is a signal
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", done.stdout + done.stderr)]
        if not codes or any(c >= 0 for c in codes) or attempt == retries:
            raise LaunchError(message, done.stdout, done.stderr)
        print(f"warning: {message}\n(killed by a signal: starting the group once more)", file=sys.stderr)
    raise AssertionError("unreachable")


def add_test_options(parser: argparse.ArgumentParser) -> None:
    """The workers' ``--collective-timeout`` and, for tests/test_processes.py, ``--fail-rank`` and ``--hang-rank``."""
    parser.add_argument("--collective-timeout", type=float, default=300,
                        help="seconds a collective (gather, barrier) waits for the other processes before it fails")
    parser.add_argument("--fail-rank", type=int, default=None,
                        help="tests only: this rank raises RuntimeError just before the results are gathered, "
                             "while the other ranks wait inside the gather")
    parser.add_argument("--hang-rank", type=int, default=None,
                        help="tests only: this rank sleeps for ever just before the results are gathered; the "
                             "others fail after --collective-timeout, or the launch's timeout stops them all")


def run_rank(rank: int, body: Callable[[], int], barrier: Callable[[], None],
             destroy: Callable[[], None]) -> int:
    """Run one rank's work the gpt-fast way: on an error, no barrier and no teardown.

    ``body()`` does the rank's work and returns its exit code. If it raises, the error is printed as
    ``rank N: Type: message`` on stderr and re-raised, so the process exits and torchrun stops the other
    ranks (a barrier here would wait for ever on a rank that already failed). Only after a success does
    the rank wait at ``barrier()`` and then tear the group down with ``destroy()``. The barrier is safe
    there (every rank that reaches it has finished its work) and needed: without it a rank that finished
    early tore down and exited while rank 0 was still writing its file, and rank 0's gloo teardown then
    aborted with "terminate called without an active exception" (SIGABRT, twice in a row on the 2-core
    CI machine). Used by ``workers/replicas.py`` and ``workers/tensor_parallel.py`` (notebook 07).
    """
    try:
        code = body()
    except Exception as e:
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    barrier()
    destroy()
    return code


def planted(args: argparse.Namespace, rank: int) -> None:
    """Raise or hang on this rank as ``args.fail_rank`` / ``args.hang_rank`` ask (:func:`add_test_options`).

    The message names the rank and the wall-clock time (``time.time()``) of the
    planted failure, so that a test can measure how long it took to surface.
    """
    if rank == args.fail_rank:
        raise RuntimeError(f"planted failure on rank {rank} (--fail-rank) at time {time.time():.3f}")
    if rank == args.hang_rank:
        print(f"rank {rank}: planted hang (--hang-rank) from time {time.time():.3f}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
