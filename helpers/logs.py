"""Silence known, harmless library messages once, so notebook outputs stay readable.

Each entry says why the message is harmless. Nothing else is filtered.
"""

from __future__ import annotations

import logging

KNOWN = {
    # bitsandbytes 0.50 on a CPU with AVX-512 BF16 tries to fetch a faster 4-bit kernel from a
    # model hub (package `kernels`); without it, its own CPU kernel runs. Offline, that is expected.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # LLM.int8 on CPU logs "inputs will be cast from torch.float32 to float16" at every matmul:
    # the int8 kernels take fp16 inputs; the cast is part of the method.
    "bitsandbytes.autograd._functions": logging.ERROR,
}


def silence_known_warnings() -> None:
    """Raise the level of the loggers in ``KNOWN`` so their routine messages are not shown.

    Also calls :func:`quiet_accelerate_progress` (a no-op outside quiet runs).
    """
    for name, level in KNOWN.items():
        logging.getLogger(name).setLevel(level)
    quiet_accelerate_progress()


def quiet_accelerate_progress() -> None:
    """In a quiet run (``TQDM_DISABLE`` set), switch off accelerate's weight-loading bar too.

    accelerate creates that bar with ``disable=False``, so ``TQDM_DISABLE`` never reaches it, and in a
    kernel with ipywidgets it stores one widget per loading step in the notebook. Interactively
    (no ``TQDM_DISABLE``) nothing changes: you see the bar.
    """
    import functools
    import os

    if not os.environ.get("TQDM_DISABLE"):
        return
    import accelerate.utils.modeling as modeling

    if not isinstance(modeling.tqdm, functools.partial):
        modeling.tqdm = functools.partial(modeling.tqdm, disable=True)
