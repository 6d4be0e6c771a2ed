"""Quiet known, harmless library messages, so notebook outputs stay readable.

Each entry says why its message is harmless. Nothing else is filtered. The
notebooks call :func:`silence_known_warnings` once, in their first cell (the
learner runs that cell, and its docstring says what it changes); tests use
:func:`known_warnings_silenced`, which undoes the same changes on leaving its block.
:func:`quiet_planning` wraps planning for GPUs this machine does not have (notebooks 03, 06 and 08).

The logger names, the messages in :data:`KNOWN_MESSAGES` and :data:`CPU_ONLY_MESSAGES`, and accelerate's
loading bar are library internals: :mod:`helpers.private_apis` lists them with
the versions they were checked against, and ``tests/test_private_apis.py``
fails when a library moves them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator

KNOWN = {
    # bitsandbytes 0.50 on a CPU with AVX-512 BF16 tries to fetch a faster 4-bit kernel from a
    # model hub (package `kernels`); without it, its own CPU kernel runs. Offline, that is expected.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # LLM.int8 on CPU logs "inputs will be cast from torch.float32 to float16" at every matmul:
    # the int8 kernels take fp16 inputs; the cast is part of the method.
    "bitsandbytes.autograd._functions": logging.ERROR,
}
"""Loggers whose level :func:`silence_known_warnings` raises, and to what."""

KNOWN_MESSAGES = {
    # dispatch_model (so load_checkpoint_and_dispatch and from_pretrained with a map) logs "Some parameters are
    # on the meta device because they were offloaded to the disk and cpu." for every map that offloads: that is
    # what offload means (the weights wait off the device until their hook loads them; notebook 02, section 4).
    "accelerate.big_modeling": ("Some parameters are on the meta device because they were offloaded",),
    # torch 2.13 logs "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by
    # torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is deprecated ..."
    # (and the same for 'ScaleCalculationMode') once per process, while torchao 0.18 registers its enums the
    # way older torch needed (torchao/utils.py); transformers imports torchao with its modeling code. torch
    # already supports them: nothing changes for a model.
    "torch.utils._pytree": (re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported"),),
    # torchao 0.18 logs "Failed to load .../torchao/_C_mxfp8....so: Could not load this library: ..." and the
    # same for _C_cutlass_90a....abi3.so once per process, at import: both hold CUDA kernels (MX-FP8, and
    # CUTLASS for compute capability 9.0) linked against libtorch_cuda, which a CPU build of torch does not
    # have. Harmless there: the formats the workbook runs on a CPU (int8 weight-only) use neither. Matched by
    # the file name, so a failure of any other torchao library still shows, and on a GPU nothing is dropped
    # (see CPU_ONLY_MESSAGES).
}
"""Messages dropped from one logger, by the start of their text (a string) or a pattern matched at their start
(a compiled regular expression); the logger's other messages still show."""

CPU_ONLY_MESSAGES = {
    "torchao": (re.compile(r"Failed to load \S*torchao/_C_(mxfp8|cutlass_90a)\.\S*\.so: "),),
}
"""Messages dropped as :data:`KNOWN_MESSAGES` are, but only where torch was built without CUDA: on a CUDA build
the same message means a GPU kernel is missing, and it shows."""


class _DropKnownMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``starts`` (strings), or whose
    start one of them matches (compiled regular expressions)."""

    def __init__(self, starts: Iterable[str | re.Pattern]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(s) if isinstance(s, str) else s.match(text) for s in self.starts)


PLANNING = (
    "accelerate.utils.modeling",  # "Device 0 is not available, available devices are []"
    "transformers.integrations.accelerate",  # "Current model requires N bytes of buffer for offloaded layers"
)
"""Loggers that warn while a map is planned for devices that are not here: expected, the plan says what matters."""


class _Undo:
    """What one :func:`_silence` changed (logger levels, filters added, accelerate's bar), to put back."""

    def __init__(self) -> None:
        self.levels: dict[str, int] = {}
        self.filters: list[tuple[str, logging.Filter]] = []
        self.tqdm: object | None = None

    def __call__(self) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        for name, flt in self.filters:
            logging.getLogger(name).removeFilter(flt)
        if self.tqdm is not None:
            import accelerate.utils.modeling as modeling

            modeling.tqdm = self.tqdm


def _silence() -> _Undo:
    """Make the changes :func:`silence_known_warnings` describes; return what puts back what it found."""
    undo = _Undo()
    for name, level in KNOWN.items():
        logger = logging.getLogger(name)
        undo.levels[name] = logger.level
        logger.setLevel(level)
    for name, starts in _known_messages().items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessages) for f in logger.filters):
            flt = _DropKnownMessages(starts)
            logger.addFilter(flt)
            undo.filters.append((name, flt))
    undo.tqdm = _quiet_accelerate_progress()
    return undo


def _known_messages() -> dict[str, tuple[str | re.Pattern, ...]]:
    """:data:`KNOWN_MESSAGES`, plus :data:`CPU_ONLY_MESSAGES` where torch was built without CUDA."""
    import torch

    return {**KNOWN_MESSAGES, **({} if torch.backends.cuda.is_built() else CPU_ONLY_MESSAGES)}


def silence_known_warnings() -> None:
    """Quiet the known, harmless library messages for the rest of this Python session.

    What it changes, all process-wide and not undone (use :func:`known_warnings_silenced` for a
    change that is undone): the loggers in :data:`KNOWN` get the level given there (their
    messages below it are no longer shown); the loggers in :data:`KNOWN_MESSAGES` (and, where
    torch was built without CUDA, :data:`CPU_ONLY_MESSAGES`) get a filter that drops the messages
    starting with the text given there (their other messages still show); and in a quiet run
    only (``TQDM_DISABLE`` set, as ``tools/env.sh`` sets it), accelerate's weight-loading bar is
    switched off (:func:`_quiet_accelerate_progress`).
    Calling it again adds nothing.

    Called in the first cell of every notebook (00 to 08): running that cell is the learner's choice.
    """
    _silence()


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """:func:`silence_known_warnings` for the ``with`` block only: on leaving it, every logger level,
    filter and the loading bar are as the block found them. The form tests use (``tests/``)."""
    undo = _silence()
    try:
        yield
    finally:
        undo()


def _quiet_accelerate_progress() -> object | None:
    """In a quiet run (``TQDM_DISABLE`` set), switch off accelerate's weight-loading bar too.

    accelerate's ``load_state_dict`` (``accelerate/utils/modeling.py``) creates that bar through its
    own ``tqdm`` wrapper with ``disable`` left False, and an explicit argument wins over
    ``TQDM_DISABLE``, so the variable never reaches it; in a kernel with ipywidgets it stores one
    widget per loading step in the notebook. accelerate offers no switch, so the wrapper that
    module calls is replaced by one with ``disable=True`` (a monkey-patch, listed in
    :mod:`helpers.private_apis`). Interactively (no ``TQDM_DISABLE``) nothing changes: you see the bar.

    Returns:
        The wrapper it replaced (to put back), or None when it changed nothing.
    """
    if not os.environ.get("TQDM_DISABLE"):
        return None
    import accelerate.utils.modeling as modeling

    if isinstance(modeling.tqdm, functools.partial):
        return None
    original = modeling.tqdm
    modeling.tqdm = functools.partial(original, disable=True)
    return original


@contextlib.contextmanager
def quiet_planning() -> Iterator[None]:
    """Within the block, silence the loggers in :data:`PLANNING`; their levels are restored afterwards.

    Planning for GPU 0 on a machine without one makes accelerate log "Device 0 is not available" once
    per call. Notebook 03 explains why that is expected.
    """
    loggers = [logging.getLogger(name) for name in PLANNING]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
