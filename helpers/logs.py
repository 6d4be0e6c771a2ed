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
    """Raise the level of the loggers in ``KNOWN`` so their routine messages are not shown."""
    for name, level in KNOWN.items():
        logging.getLogger(name).setLevel(level)
