"""Quiet known, harmless library messages, so notebook outputs stay readable.

Each entry says why its message is harmless. Nothing else is filtered. The
notebooks call :func:`silence_known_warnings` once at the top;
:func:`quiet_planning` wraps planning for GPUs this machine does not have
(notebooks 03, 04 and 06).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

KNOWN = {
    # bitsandbytes 0.50 on a CPU with AVX-512 BF16 tries to fetch a faster 4-bit kernel from a
    # model hub (package `kernels`); without it, its own CPU kernel runs. Offline, that is expected.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # LLM.int8 on CPU logs "inputs will be cast from torch.float32 to float16" at every matmul:
    # the int8 kernels take fp16 inputs; the cast is part of the method.
    "bitsandbytes.autograd._functions": logging.ERROR,
}

KNOWN_MESSAGES = {
    # dispatch_model (so load_checkpoint_and_dispatch and from_pretrained with a map) logs "Some parameters are
    # on the meta device because they were offloaded to the disk and cpu." for every map that offloads: that is
    # what offload means (the weights wait off the device until their hook loads them; notebook 02, section 4).
    "accelerate.big_modeling": ("Some parameters are on the meta device because they were offloaded",),
}
"""Messages, by the start of their text, dropped from one logger; the logger's other messages still show."""


class _DropKnownMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.starts)


PLANNING = (
    "accelerate.utils.modeling",  # "Device 0 is not available, available devices are []"
    "transformers.integrations.accelerate",  # "Current model requires N bytes of buffer for offloaded layers"
)
"""Loggers that warn while a map is planned for devices that are not here: expected, the plan says what matters."""


def silence_known_warnings() -> None:
    """Raise the level of the loggers in :data:`KNOWN`, drop the :data:`KNOWN_MESSAGES`, and quiet accelerate's
    loading bar in quiet runs. Calling it again adds nothing.

    Called at the top of every notebook (00 to 06).
    """
    for name, level in KNOWN.items():
        logging.getLogger(name).setLevel(level)
    for name, starts in KNOWN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessages) for f in logger.filters):
            logger.addFilter(_DropKnownMessages(starts))
    _quiet_accelerate_progress()


def _quiet_accelerate_progress() -> None:
    """In a quiet run (``TQDM_DISABLE`` set), switch off accelerate's weight-loading bar too.

    accelerate creates that bar with ``disable=False``, so ``TQDM_DISABLE`` never reaches it, and in a
    kernel with ipywidgets it stores one widget per loading step in the notebook. Interactively
    (no ``TQDM_DISABLE``) nothing changes: you see the bar. Part of :func:`silence_known_warnings`.
    """
    if not os.environ.get("TQDM_DISABLE"):
        return
    import accelerate.utils.modeling as modeling

    if not isinstance(modeling.tqdm, functools.partial):
        modeling.tqdm = functools.partial(modeling.tqdm, disable=True)


@contextlib.contextmanager
def quiet_planning():
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
