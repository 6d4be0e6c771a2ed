"""Thin helpers for the big-model workbook.

They hide boilerplate (fetching the bundled model, reporting hardware,
measuring memory and speed, drawing device maps, checking a map before a
load); the notebooks call the library APIs they teach inline.
"""

from .logs import silence_known_warnings
from .model import (
    BUNDLED,
    CacheError,
    CheckpointError,
    bundled_checkpoint,
    cache_dir,
    resolve_model,
    verify_checkpoint,
)

__all__ = [
    "BUNDLED",
    "CacheError",
    "CheckpointError",
    "bundled_checkpoint",
    "cache_dir",
    "resolve_model",
    "silence_known_warnings",
    "verify_checkpoint",
]
