"""A report of this machine: versions, devices, memory, disk, and the bitsandbytes library actually loaded (notebook 00)."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
from pathlib import Path

from .units import GiB

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "gguf")


def _version(name: str) -> str:
    """Installed _version of a distribution, or ``"not installed"`` (notebook 00)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_count() -> int:
    """Number of CUDA devices torch can use (0 on a CPU-only build or machine). :func:`report` lists them."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def bnb_library() -> dict:
    """Which native library bitsandbytes loaded, read from bitsandbytes itself.

    bitsandbytes 0.50 picks its library at import: ``libbitsandbytes_cpu.so``
    without CUDA, else the CUDA build matching torch's CUDA _version (e.g.
    ``libbitsandbytes_cuda130.so`` for CUDA 13.0). It runs LLM.int8 and 4-bit
    on the CPU too (dequantize, then multiply in the compute dtype).

    Returns:
        ``{"backend": "cuda" | "cpu" | "xpu" | "none", "library": file name or
        None, "cuda": "13.0" or None}``; ``backend`` is ``"not installed"``
        without bitsandbytes, and ``"none"`` when it loaded no native library
        (it then runs its pure-torch fallbacks on the CPU).

    Notebook 00 prints it.
    """
    from .quiet import silence_known_warnings

    silence_known_warnings()
    try:
        from bitsandbytes import cextension
    except ImportError:
        return {"backend": "not installed", "library": None, "cuda": None}
    dll = getattr(cextension.lib, "_lib", None)
    name = Path(getattr(dll, "_name", "") or "").name or None
    if name is None:
        return {"backend": "none", "library": None, "cuda": None}
    m = re.search(r"cuda(\d+)(\d)\b", name)
    cuda = f"{m.group(1)}.{m.group(2)}" if m else None
    backend = "cuda" if getattr(cextension.lib, "compiled_with_cuda", False) else ("xpu" if "xpu" in name else "cpu")
    return {"backend": backend, "library": name, "cuda": cuda}


def bnb_backend() -> str:
    """One line for :func:`report`: e.g. ``"cuda (libbitsandbytes_cuda130.so, CUDA 13.0)"`` or ``"cpu (libbitsandbytes_cpu.so)"``. Notebook 00."""
    lib = bnb_library()
    if lib["library"] is None:
        return lib["backend"]
    return f"{lib['backend']} ({lib['library']}" + (f", CUDA {lib['cuda']})" if lib["cuda"] else ")")


def report(cache: str | Path | None = None) -> dict:
    """Collect versions, devices and memory.

    Args:
        cache: a folder whose file system's free space is reported (default:
            the workbook's cache).

    Returns:
        A dict: ``python``, one key per package in ``PACKAGES``, ``cuda``
        (torch's CUDA _version or ``None``), ``bnb_backend`` (see
        :func:`bnb_backend`), ``gpus`` (list of
        ``(name, total GiB)``), ``cpu_cores``, ``ram_total_gib``,
        ``ram_available_gib``, ``disk_free_gib`` (all GiB = 2**30 bytes,
        rounded to 0.1).

    Notebook 00 explains each entry.
    """
    import psutil
    import torch

    from .checkpoints import cache_dir

    gpus = []
    for i in range(gpu_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append((p.name, round(p.total_memory / GiB, 1)))
    vm = psutil.virtual_memory()
    where = Path(cache) if cache else cache_dir()
    info = {"python": platform.python_version()}
    info.update({name: _version(name) for name in PACKAGES})
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
    """Print :func:`report` as aligned lines (the first cell of every notebook)."""
    info = info or report()
    for key, value in info.items():
        if key == "gpus":
            value = ", ".join(f"{n} ({g} GiB)" for n, g in value) or "none"
        print(f"{key:>18}: {value}")
