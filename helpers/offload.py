"""What a token costs when part of the model is offloaded to the CPU or the disk (notebook 05).

accelerate's offload (``from_pretrained(..., device_map=...)`` with modules on "cpu" or "disk", or
``dispatch_model``) keeps those modules' weights off the GPU and puts an ``AlignDevicesHook`` on each: before
the module's forward the hook copies its weights to the execution device (``set_module_tensor_to_device`` in
``accelerate/hooks.py``, ``pre_forward``), after it drops them again (``post_forward``). So every offloaded byte
crosses the host-to-device link once per forward, that is once per generated token; weights on "disk" are
first read from disk: for a safetensors checkpoint from the checkpoint's own files (transformers 5.24 puts them
in the offload index as they are, and accelerate's ``OffloadedWeightsLoader`` reads each with ``safe_open``; the
offload folder stays empty), otherwise from ``.dat`` files written to the offload folder. A file the page cache
still holds is read from RAM instead. The alternative is to compute the offloaded layers on the CPU, where the
cost is the CPU's memory bandwidth reading those bytes (llama.cpp's partial offload, ``-ngl``).

:func:`offload_seconds_per_token` is the arithmetic; :func:`host_to_device_rate` and :func:`disk_read_rate`
measure the two rates on this machine. The one-GPU reference (``gpu-reference/one-gpu/results.json``, read
with ``helpers.reference.reference_results("one-gpu")``) holds the rates measured on an H200 machine:
``h2d`` (pageable and pinned copies) and ``offload`` (the effective rate fitted from timed cpu-offload runs).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .units import GiB, MiB


def offload_seconds_per_token(gpu_bytes: float, cpu_bytes: float = 0, disk_bytes: float = 0, *,
                              gpu_bandwidth: float, h2d_rate: float | None = None, disk_rate: float | None = None,
                              cpu_compute: bool = False, cpu_bandwidth: float | None = None,
                              disk_cached: bool = False) -> dict:
    """Predicted seconds per generated token (batch 1) of a model split over a GPU, host RAM and disk.

    The model: a decode step reads every weight once (the decode roofline of notebook 04), so

    - the bytes on the GPU cost ``gpu_bytes / gpu_bandwidth``;
    - each offloaded byte on "cpu" crosses to the GPU once per token: ``cpu_bytes / h2d_rate``;
    - each byte on "disk" is read from disk (``disk_bytes / disk_rate``; skipped with ``disk_cached=True``,
      where the page cache holds the files) and then crosses too (``disk_bytes / h2d_rate``);
    - or, with ``cpu_compute=True``, the offloaded layers run on the CPU instead and read their bytes at
      ``cpu_bandwidth`` (disk bytes still come from disk first); nothing crosses but the hidden state.

    The terms add up: one layer runs after another, and accelerate's hooks copy a layer's weights when its
    forward starts (no overlap with the previous layer's compute), so the sum is the prediction; it is a lower
    bound for compute-bound shapes (it counts bytes, not FLOP). Every rate is in bytes/s. Batch 1: with a larger
    batch the copy is shared by the batch's sequences, so the time per step is roughly the same.

    Args:
        gpu_bytes, cpu_bytes, disk_bytes: weight bytes (with quantization scales) on each.
        gpu_bandwidth: the GPU's memory bandwidth (``helpers.measure.memory_bandwidth("cuda")``).
        h2d_rate: host-to-device copy rate (:func:`host_to_device_rate`; accelerate copies from pageable
            memory unless the weights were pinned). Needed when ``cpu_bytes`` or ``disk_bytes`` cross.
        disk_rate: the disk's read rate (:func:`disk_read_rate`). Needed for ``disk_bytes`` unless cached.
        cpu_compute: compute offloaded layers on the CPU instead of copying them.
        cpu_bandwidth: the CPU's memory bandwidth (``helpers.measure.memory_bandwidth("cpu")``), needed with
            ``cpu_compute``.
        disk_cached: the disk files sit in the page cache (enough free RAM), so they are read at RAM speed
            (counted as free).

    Returns:
        ``{"gpu_s", "h2d_s", "disk_s", "cpu_s", "seconds_per_token", "tokens_per_s", "assumptions"}``:
        each term in seconds, their sum, its inverse, and a sentence naming the rates used.

    Raises:
        ValueError: a negative byte count, a missing or non-positive rate a term needs.

    Notebook 05.
    """
    for name, v in (("gpu_bytes", gpu_bytes), ("cpu_bytes", cpu_bytes), ("disk_bytes", disk_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name} must be a number of bytes >= 0, not {v!r}")

    def rate(name, value, needed):
        if not needed:
            return value
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a rate in bytes/s above 0 for this split, not {value!r} (measure it: "
                             f"helpers.offload.host_to_device_rate, disk_read_rate, helpers.measure.memory_bandwidth)")
        return float(value)

    crossing = 0 if cpu_compute else cpu_bytes + disk_bytes
    gpu_bw = rate("gpu_bandwidth", gpu_bandwidth, gpu_bytes > 0)
    h2d = rate("h2d_rate", h2d_rate, crossing > 0)
    disk = rate("disk_rate", disk_rate, disk_bytes > 0 and not disk_cached)
    cpu_bw = rate("cpu_bandwidth", cpu_bandwidth, cpu_compute and cpu_bytes + disk_bytes > 0)
    terms = {
        "gpu_s": gpu_bytes / gpu_bw if gpu_bytes else 0.0,
        "h2d_s": crossing / h2d if crossing else 0.0,
        "disk_s": disk_bytes / disk if disk_bytes and not disk_cached else 0.0,
        "cpu_s": (cpu_bytes + disk_bytes) / cpu_bw if cpu_compute and cpu_bytes + disk_bytes else 0.0,
    }
    total = sum(terms.values())
    used = [f"GPU {_gbps(gpu_bw)}" if gpu_bytes else None,
            f"host to device {_gbps(h2d)}" if crossing else None,
            f"disk {_gbps(disk)}" if terms["disk_s"] else None,
            "disk files in the page cache (read at no cost)" if disk_bytes and disk_cached else None,
            f"CPU computes the offloaded layers at {_gbps(cpu_bw)}" if terms["cpu_s"] else None]
    how = ("" if not cpu_bytes + disk_bytes else ", offloaded weights read by the CPU where they sit" if cpu_compute
           else ", offloaded weights copied to the GPU for every token, no overlap of copies and compute")
    assumptions = f"batch 1, every weight read once per token{how}; rates: " + ", ".join(u for u in used if u)
    return {**terms, "seconds_per_token": total, "tokens_per_s": (1 / total) if total else float("inf"),
            "assumptions": assumptions}


def _gbps(rate: float) -> str:
    """A rate in bytes/s written in GB/s: ``"4,113 GB/s"``, ``"6.77 GB/s"``."""
    v = rate / 1e9
    return f"{v:,.0f} GB/s" if v >= 100 else f"{v:.3g} GB/s"


def host_to_device_rate(pinned: bool, gib: float = 1.0, repeats: int = 5, device: int | str = 0) -> float:
    """The host-to-device copy rate in bytes/s: a copy of ``gib`` GiB from RAM to the GPU, median of ``repeats``.

    ``pinned=True`` copies from page-locked memory (``pin_memory()``), the fastest path; ``pinned=False`` from
    ordinary (pageable) memory, which the driver first copies through a pinned staging buffer: the path
    accelerate's offload hooks take for weights that were not pinned. One untimed copy first.

    Raises:
        RuntimeError: no CUDA GPU here (this is a GPU measurement; on a CPU-only machine there is no host-to-device
            link: read the one-GPU reference instead, ``helpers.reference.reference_results("one-gpu")["h2d"]``).
        ValueError: ``gib`` below 0.25 or ``repeats`` below 3.

    Notebook 05.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("host_to_device_rate measures copies from RAM to a CUDA GPU, and this machine has none: "
                           "read the rates measured on a GPU instead, helpers.reference.reference_results('one-gpu')"
                           "['h2d'] (GB/s, pageable and pinned)")
    if gib < 0.25 or repeats < 3:
        raise ValueError("measure with at least 0.25 GiB and at least 3 repeats")
    n = int(gib * GiB)
    src = torch.ones(n, dtype=torch.uint8)
    if pinned:
        src = src.pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return n / statistics.median(times)


def disk_read_rate(folder: str | os.PathLike, mib: int = 512, repeats: int = 3) -> dict:
    """The disk's read rate in bytes/s in ``folder``: write a file of ``mib`` MiB, evict it, read it back timed.

    Each repeat writes the file (random bytes, so no compression helps), ``fsync`` s it, asks the kernel to drop
    its pages from the page cache (``os.posix_fadvise(..., POSIX_FADV_DONTNEED)``), reads it whole in 16 MiB
    chunks, and deletes it. Eviction is a request, not a guarantee: pages still dirty, a file system that
    ignores the advice (some network and FUSE file systems, tmpfs, which lives in RAM anyway) or a platform
    without ``posix_fadvise`` leave the pages cached, and the read then runs at memory speed. ``cached`` in the
    result says whether eviction was possible; a read far above the write rate also gives it away.

    Args:
        folder: an existing folder on the disk to measure (e.g. the offload folder). Only the one temporary file
            this function creates there is written and deleted.
        mib: file size in MiB (>= 64; larger than the disk's own cache gives a truer rate).
        repeats: timed reads (>= 1); the median is returned.

    Returns:
        ``{"read_Bps": median read rate, "write_Bps": median write rate (fsync included), "evicted": True where
        posix_fadvise exists and the file system is not tmpfs, "folder": str}``.

    Raises:
        FileNotFoundError: ``folder`` is not an existing folder.
        ValueError: ``mib`` below 64 or ``repeats`` below 1.
        OSError: the folder is not writable or has no room for the file.

    Notebook 05.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not an existing folder: pass the folder on the disk to measure")
    if mib < 64 or repeats < 1:
        raise ValueError("measure with a file of at least 64 MiB and at least 1 repeat")
    chunk = os.urandom(16 * MiB)
    n_chunks = max(1, mib // 16)
    can_evict = hasattr(os, "posix_fadvise") and not _is_tmpfs(folder)
    reads, writes = [], []
    for _ in range(repeats):
        fd, name = tempfile.mkstemp(prefix=".disk-rate-", suffix=".tmp", dir=folder)
        try:
            t0 = time.perf_counter()
            with os.fdopen(fd, "wb", buffering=0) as f:
                for _ in range(n_chunks):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
                writes.append(n_chunks * len(chunk) / (time.perf_counter() - t0))
                if can_evict:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            with open(name, "rb", buffering=0) as f:
                while f.read(16 * MiB):
                    pass
            reads.append(n_chunks * len(chunk) / (time.perf_counter() - t0))
        finally:
            os.unlink(name)
    return {"read_Bps": statistics.median(reads), "write_Bps": statistics.median(writes), "evicted": can_evict,
            "folder": str(folder)}


def _is_tmpfs(folder: Path) -> bool:
    """Whether ``folder`` lives on tmpfs/ramfs (RAM: nothing to evict), read from /proc/mounts where it exists."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path, best = str(folder.resolve()), ("", "")
    for m in mounts:
        if len(m) > 2 and (path == m[1] or path.startswith(m[1].rstrip("/") + "/")) and len(m[1]) > len(best[0]):
            best = (m[1], m[2])
    return best[1] in ("tmpfs", "ramfs")
