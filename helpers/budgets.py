"""Budgets: ``max_memory`` read as accelerate 1.15 reads it, refused where it cannot be meant.

:func:`parse_budget` turns a ``max_memory`` dict into {device: bytes} exactly as accelerate's
``get_max_memory`` and ``convert_file_size_to_int`` would, but refuses (ValueError, naming the fix)
what accelerate refuses or crashes on and what cannot be meant, and warns (:class:`BudgetWarning`)
about what it silently takes but is probably a mistake (sizes in bits, a GPU with 0 bytes). It never
changes the dict passed in (accelerate converts the strings in place).

This module owns budgets; it builds on the device vocabulary of :mod:`helpers.devicemap`, and
:mod:`helpers.preflight` builds on it (``preflight`` reads its ``max_memory`` here). Notebook 03
explains how ``max_memory`` is read; notebook 06 troubleshoots bad budgets.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping

import torch
from accelerate.utils import convert_file_size_to_int

from .devicemap import ACCELERATORS, STRATEGIES, device_label


class BudgetWarning(UserWarning):
    """A ``max_memory`` that accelerate accepts but that is probably a mistake (sizes in bits, a GPU with 0 bytes).

    Raised through :func:`warnings.warn` by :func:`parse_budget` (and so by
    :func:`helpers.preflight.preflight`); filter it with
    ``warnings.simplefilter("error", BudgetWarning)`` to make it fatal, or
    ``"ignore"`` when the budget is meant. Notebook 03 explains how accelerate
    reads ``max_memory``; notebook 06 troubleshoots budgets.
    """


def budget_key(dev):
    """The ``max_memory`` key that budgets a canonical device (:func:`helpers.devicemap.canonical_device`).

    GPU ids and "xpu:N" (any accelerator string) alike read key N: accelerate's
    integer ids are the ids of the machine's accelerators, whatever their type.
    "cpu", "disk" and "mps" are their own keys. Used by :func:`helpers.preflight.preflight`
    to set each device's bytes against its budget (notebook 03).
    """
    if isinstance(dev, str) and ":" in dev:
        return int(dev.rsplit(":", 1)[1])
    return dev


def _warn(message: str, stacklevel: int) -> None:
    warnings.warn(message, BudgetWarning, stacklevel=stacklevel + 1)


def _key_of(key):
    """A max_memory key as accelerate's get_max_memory takes it (int >= 0, "mps", "cpu", "disk").

    Anything else raises ValueError naming the fix (accelerate refuses it too,
    except booleans and negative ids, which it takes as GPU ids).
    """
    if isinstance(key, bool):
        raise ValueError(f"max_memory key {key!r} is a boolean, not a device: use GPU ids (0, 1, ...), "
                         f"'cpu' or 'disk'.")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"max_memory key {key} is not a GPU id: ids count from 0 (use 0, 1, ...).")
        return key
    if isinstance(key, str) and key in ("cpu", "disk", "mps"):
        return key
    text = str(key) if isinstance(key, torch.device) else key
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(cuda|gpu|" + "|".join(ACCELERATORS) + r")(?::(\d+))?\s*", text.lower())
        if m:
            n = int(m.group(2) or 0)
            raise ValueError(
                f"max_memory key {key!r}: accelerate's get_max_memory (and so infer_auto_device_map, "
                f"load_checkpoint_and_dispatch and from_pretrained) refuses it ('Device {text} is not recognized'): "
                f"name the GPU by its integer id, max_memory={{{n}: ...}} instead of {{{text!r}: ...}}.")
        plain = text.strip().lower()
        if plain in ("cpu", "disk", "mps") or plain.isdigit():
            fixed = int(plain) if plain.isdigit() else plain
            raise ValueError(f"max_memory key {key!r}: accelerate refuses it ('Device {text} is not recognized'): "
                             f"write {fixed!r} instead.")
    raise ValueError(f"max_memory key {key!r} is not a device: use GPU ids (0, 1, ...), 'mps', 'cpu' or 'disk'.")


def _bytes_of(key, value, stacklevel: int) -> int:
    """A max_memory value in bytes, refusing what cannot be meant and warning about sizes in bits."""
    where = f"max_memory[{key!r}] = {value!r}"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{where} is a boolean, not a size (accelerate would read True as 1 byte): give bytes "
                         f"(an int) or a string such as '35GiB'.")
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"{where} is NaN, not a size (accelerate then places nothing on that device, "
                             f"silently): give bytes (an int) or a string such as '35GiB'.")
        if math.isinf(v):
            raise ValueError(f"{where} is infinite: no device holds unlimited weights; give its real size "
                             f"(e.g. '80GiB'); for 'disk', leave the key out (it needs no budget).")
        if v < 0:
            raise ValueError(f"{where} is negative: give a size of 0 or more (bytes, or a string such as '35GiB'); "
                             f"to use no memory on a device, leave it out of max_memory.")
        return int(value)
    if isinstance(value, str):
        try:
            n = convert_file_size_to_int(value)  # the string as given: accelerate does not strip it either
        except (ValueError, OverflowError):  # "infGB" overflows inside accelerate
            raise ValueError(
                f"{where} is not a size: give bytes (an int) or a string such as '35GiB' (2**30 bytes each) or "
                f"'500MB' (10**6 bytes each); accelerate refuses 'TB', a bare 'G' or 'B', spaces after the unit "
                f"and negative sizes.") from None
        upper = value.upper()
        if value.endswith("b") and upper.endswith(("GB", "MB", "KB")) and not upper.endswith(("GIB", "MIB", "KIB")):
            num, letter = value[:-2], value[-2].upper()
            _warn(f"{where} is read by accelerate as {letter}-bits (a lowercase final 'b' after G, M or K means bits): "
                  f"{n:,} bytes, 1/8 of '{num}{letter}B'. Write '{num}{letter}B' ({num} x 10**"
                  f"{ {'G': 9, 'M': 6, 'K': 3}[letter]} bytes) or '{num}{letter}iB' ({num} x 2**"
                  f"{ {'G': 30, 'M': 20, 'K': 10}[letter]} bytes).", stacklevel + 1)
        return n
    raise ValueError(f"{where} is not a size: give bytes (an int) or a string such as '35GiB' (2**30 bytes each) "
                     f"or '500MB' (10**6 bytes each).")


def _parse(max_memory, strategy, stacklevel: int) -> dict:
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {(None,) + STRATEGIES}, not {strategy!r}.")
    if max_memory is None:
        return {}
    if isinstance(max_memory, (str, bytes, numbers.Number)):
        raise ValueError(
            f"max_memory must be a dict {{device: size}}, not {max_memory!r} (accelerate fails with 'TypeError: string "
            f"indices must be integers'): write max_memory={{0: {max_memory!r}}} for GPU 0 (one entry per GPU, plus "
            f"'cpu' for offloading), e.g. {{0: {max_memory!r}, 'cpu': '30GiB'}}.")
    if not isinstance(max_memory, Mapping):
        raise ValueError(f"max_memory must be a dict {{device: size}}, not a {type(max_memory).__name__}: "
                         f"e.g. {{0: '35GiB', 'cpu': '30GiB'}}.")
    out = {}
    for key, value in max_memory.items():
        dev = _key_of(key)
        out[dev] = _bytes_of(key, value, stacklevel + 1)
    for dev, n in out.items():
        if n == 0 and (isinstance(dev, int) or dev == "mps"):
            extra = (" With strategy 'balanced_low_0' it is worse: accelerate counts only GPUs with a budget above 0, "
                     "so it no longer keeps GPU 0 light and the weights land on GPU 0 first."
                     if strategy == "balanced_low_0" and dev != 0 else "")
            _warn(f"max_memory[{dev!r}] = 0: {device_label(dev)} gets no weights at all, which is rarely meant "
                  f"(a typo, or a unit lost?).{extra} Give it its size (e.g. '20GiB'), or leave it out of max_memory "
                  f"to say 'do not use it'.", stacklevel + 1)
    gpus = sorted(d for d in out if isinstance(d, int))
    if strategy == "balanced_low_0":
        used = [d for d in gpus if out[d] > 0]
        need = list(range(len(used)))
        if len(used) > 1 and any(i not in out for i in need):
            # accelerate sums max_memory[1..n-1] first, then reads max_memory[0]: the first absent key is the KeyError
            missing = [i for i in need[1:] + [0] if i not in out]
            raise ValueError(
                f"with strategy 'balanced_low_0' accelerate's get_balanced_memory reads the budgets of GPUs "
                f"0..{len(used) - 1} by id, and max_memory has GPUs {gpus}: it fails with KeyError: {missing[0]}. "
                f"Number the GPUs from 0 without gaps (run with CUDA_VISIBLE_DEVICES={','.join(map(str, used))} so "
                f"they become 0..{len(used) - 1}, and write max_memory={{{', '.join(f'{i}: ...' for i in need)}}}), "
                f"or plan with 'balanced' or 'sequential'.")
    return out


def parse_budget(max_memory: dict | None, strategy: str | None = None, *, stacklevel: int = 1) -> dict:
    """Check a ``max_memory`` dict as accelerate 1.15 would read it, and turn it into {device: bytes}.

    Keys: GPU ids (ints 0, 1, ...), ``"mps"``, ``"cpu"``, ``"disk"``: exactly
    what accelerate's ``get_max_memory`` accepts. Values: bytes (an int or a
    float) or size strings read by accelerate's ``convert_file_size_to_int``:
    "35GiB" is 35 * 2**30 bytes, "500MB" is 500 * 10**6. The dict passed in
    is never changed (accelerate converts the strings in place; this does not).

    Args:
        max_memory: the budget, or None (no budget: returns {}).
        strategy: the ``device_map`` string the budget is planned with
            ("auto", "balanced", "balanced_low_0", "sequential"), or None for a
            map written by hand; "balanced_low_0" adds its own checks.
        stacklevel: whose line a :class:`BudgetWarning` points to: 1 (default) the
            caller of ``parse_budget``, 2 its caller (:func:`helpers.preflight.preflight`
            passes 2, so the warning names the learner's cell).

    Returns:
        {device: bytes}, GPU ids as ints, in the order given.

    Raises:
        ValueError, naming the fix, where accelerate refuses or crashes:
            ``max_memory`` not a dict (a string "10GB": accelerate fails with
            TypeError); a key "cuda:0" (or "xpu:0", "gpu"): accelerate says
            "Device cuda:0 is not recognized", use the id ``0``; a key that is
            not a device; with ``strategy="balanced_low_0"``, GPU ids that
            skip one (``{0: X, 2: X}``: KeyError: 1 inside accelerate's
            ``get_balanced_memory``); a value that is not a size. And where a
            value cannot be meant though accelerate takes it: negative,
            boolean, infinite or NaN budgets. Also an unknown ``strategy``.

    Warns:
        :class:`BudgetWarning` where accelerate silently accepts something
        that is probably a mistake: sizes in bits ("10Gb", "10gb", "10mb": a
        lowercase final "b" after G/M/K means bits, 1/8 of the bytes; "24Gib"
        is GiB, not bits) and a budget of 0 on a GPU (with "balanced_low_0" a 0
        on GPU 1 sends everything to GPU 0).

    Notebook 03 explains how ``max_memory`` is read; notebook 06 troubleshoots
    bad budgets.
    """
    return _parse(max_memory, strategy, stacklevel=stacklevel + 1)
