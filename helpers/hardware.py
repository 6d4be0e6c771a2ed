"""A report of this machine: versions, devices, memory, disk, and the bitsandbytes library loaded (notebook 00)."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from pathlib import Path

from .units import GiB

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "torchao", "safetensors", "gguf")


def _version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"`` (notebook 00)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def bnb_library() -> dict:
    """Which native library bitsandbytes loaded, read from bitsandbytes' own public names.

    bitsandbytes 0.50 picks its library at import (``bitsandbytes.cextension.get_native_library``):
    ``libbitsandbytes_cpu.so`` without CUDA, else the CUDA build that
    ``get_cuda_bnb_library_path`` selects for torch's CUDA version (e.g.
    ``libbitsandbytes_cuda130.so`` for CUDA 13.0). This asks the same public
    functions (the ones ``python -m bitsandbytes`` reports with; a fallback
    to another CUDA build is logged again, as at import), and
    whether the import loaded it (``cextension.lib`` is not the
    ``ErrorHandlerMockBNBNativeLibrary`` stand-in). No file name is parsed and
    no private attribute is read. bitsandbytes runs LLM.int8 and 4-bit on the
    CPU too: in general it dequantizes, then multiplies in the compute dtype;
    on a CPU with AVX-512 BF16 its fused 4-bit kernel multiplies in bfloat16
    whatever compute dtype was asked for (notebook 01 shows which).

    Importing bitsandbytes may log a notice on a CPU without its optional
    kernels: call :func:`helpers.quiet.silence_known_warnings` first to quiet it.

    Returns:
        ``{"backend": "cuda" | "cpu" | "xpu" | "none", "library": file name or
        None, "cuda": "13.0" or None}``; ``backend`` is ``"not installed"``
        without bitsandbytes, and ``"none"`` when it loaded no native library
        (it then runs its pure-torch fallbacks on the CPU). ``cuda`` is the
        CUDA (or ROCm) version bitsandbytes matched its library against
        (torch's, from ``bitsandbytes.cuda_specs.get_cuda_specs``); the file
        name says which build it chose for it.

    Notebook 00 prints it.
    """
    try:
        from bitsandbytes import cextension, consts, cuda_specs
    except ImportError:
        return {"backend": "not installed", "library": None, "cuda": None}
    if isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        return {"backend": "none", "library": None, "cuda": None}
    specs = cuda_specs.get_cuda_specs()
    if cextension.BNB_BACKEND == "XPU":
        path, backend = cextension.get_xpu_bnb_library_path(), "xpu"
    elif specs is not None and cextension.BNB_BACKEND in ("CUDA", "ROCm"):
        path = cextension.get_cuda_bnb_library_path(specs)
        backend = "cuda" if cextension.lib.compiled_with_cuda else "cpu"
    else:
        path, backend = consts.PACKAGE_DIR / f"libbitsandbytes_cpu{consts.DYNAMIC_LIBRARY_SUFFIX}", "cpu"
    cuda = ".".join(map(str, specs.cuda_version_tuple)) if specs is not None and backend == "cuda" else None
    return {"backend": backend, "library": Path(path).name, "cuda": cuda}


def bnb_backend() -> str:
    """One line for :func:`report`, from :func:`bnb_library`. Notebook 00.

    E.g. ``"cuda (libbitsandbytes_cuda130.so, CUDA 13.0)"`` or ``"cpu (libbitsandbytes_cpu.so)"``.
    """
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
        (torch's CUDA version or ``None``), ``bnb_backend`` (see
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
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
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
