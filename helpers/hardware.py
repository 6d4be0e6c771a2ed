"""A report of this machine: versions, devices, memory, disk, the bitsandbytes backend."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from pathlib import Path

GiB = 1024**3

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "gguf")


def version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_count() -> int:
    """Number of CUDA devices torch can use (0 on a CPU-only build or machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def bnb_backend() -> str:
    """Which bitsandbytes backend will run the quantized layers: ``"cuda"`` or ``"cpu"``.

    bitsandbytes 0.50 runs LLM.int8 and 4-bit on the CPU too (it dequantizes
    and multiplies in the compute dtype); on a CUDA machine it loads its CUDA
    library. Returns ``"not installed"`` without bitsandbytes.
    """
    from .logs import silence_known_warnings

    silence_known_warnings()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "not installed"
    return "cuda" if gpu_count() else "cpu"


def report(cache: str | Path | None = None) -> dict:
    """Collect versions, devices and memory.

    Args:
        cache: a folder whose file system's free space is reported (default:
            the workbook's cache).

    Returns:
        A dict: ``python``, one key per package in ``PACKAGES``, ``cuda``
        (torch's CUDA version or ``None``), ``bnb_backend``, ``gpus`` (list of
        ``(name, total GiB)``), ``cpu_cores``, ``ram_total_gib``,
        ``ram_available_gib``, ``disk_free_gib`` (all GiB = 2**30 bytes,
        rounded to 0.1).
    """
    import psutil
    import torch

    from .model import cache_dir

    gpus = []
    for i in range(gpu_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append((p.name, round(p.total_memory / GiB, 1)))
    vm = psutil.virtual_memory()
    where = Path(cache) if cache else cache_dir()
    info = {"python": platform.python_version()}
    info.update({name: version(name) for name in PACKAGES})
    info.update(
        cuda=torch.version.cuda,
        bnb_backend=bnb_backend(),
        gpus=gpus,
        cpu_cores=psutil.cpu_count(logical=True),
        ram_total_gib=round(vm.total / GiB, 1),
        ram_available_gib=round(vm.available / GiB, 1),
        disk_free_gib=round(shutil.disk_usage(where).free / GiB, 1),
    )
    return info


def print_report(info: dict | None = None) -> None:
    """Print :func:`report` as aligned lines."""
    info = info or report()
    for key, value in info.items():
        if key == "gpus":
            value = ", ".join(f"{n} ({g} GiB)" for n, g in value) or "none"
        print(f"{key:>18}: {value}")
