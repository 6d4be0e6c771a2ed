"""Budgets: ``max_memory`` read as accelerate 1.15 reads it, refused where it cannot be meant.

:func:`parse_budget` turns a ``max_memory`` dict into {device: bytes} by calling accelerate's own
``get_max_memory`` (on a copy: accelerate converts the strings in place, so the dict passed in is
never changed). Where accelerate refuses or crashes, it raises a ValueError that quotes accelerate's
error whole and names the fix; it refuses too what accelerate takes but cannot be meant (negative,
boolean, infinite or NaN sizes, boolean or negative keys); and it adds the workbook's own warnings
(:class:`BudgetWarning`) about what accelerate silently takes but is probably a mistake (sizes in
bits, a GPU with 0 bytes, and for "balanced_low_0" GPU ids with a gap).

This module owns budgets; it builds on the device vocabulary of :mod:`helpers.devicemap`, and
:mod:`helpers.preflight` builds on it (``preflight`` reads its ``max_memory`` here). Notebook 03
explains how ``max_memory`` is read; notebook 08 troubleshoots bad budgets.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import warnings
from collections.abc import Mapping

import torch
from accelerate.utils import get_max_memory

from .devicemap import ACCELERATORS, STRATEGIES, device_label
from .quiet import quiet_planning


class BudgetWarning(UserWarning):
    """A ``max_memory`` that accelerate accepts but that is probably a mistake (sizes in bits, a GPU with 0 bytes).

    Raised through :func:`warnings.warn` by :func:`parse_budget` (and so by
    :func:`helpers.preflight.preflight`); filter it with
    ``warnings.simplefilter("error", BudgetWarning)`` to make it fatal, or
    ``"ignore"`` when the budget is meant. Notebook 03 explains how accelerate
    reads ``max_memory``; notebook 08 troubleshoots budgets.
    """


def budget_key(dev: int | str) -> int | str:
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


def _accelerate_reads(max_memory: Mapping) -> dict:
    """accelerate's own reading: ``get_max_memory`` on a copy (it converts strings in place).

    Its warning for GPU ids this machine lacks ("Device 0 is not available") is expected while
    planning and is quieted (:func:`helpers.quiet.quiet_planning`). Its errors propagate.
    """
    with quiet_planning():
        return get_max_memory(dict(max_memory))


def _refused_key(key, error: Exception) -> str | None:
    """The fix for a key accelerate's ``get_max_memory`` refused (``error``), or None if ``key`` is not the one."""
    if isinstance(key, int) and not isinstance(key, bool) or key in ("cpu", "disk", "mps"):
        return None
    said = f"accelerate's get_max_memory refuses it ({type(error).__name__}: {error})"
    text = str(key) if isinstance(key, torch.device) else key
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(cuda|gpu|" + "|".join(ACCELERATORS) + r")(?::(\d+))?\s*", text.lower())
        if m:
            n = int(m.group(2) or 0)
            return (f"max_memory key {key!r}: name the GPU by its integer id, max_memory={{{n}: ...}} instead of "
                    f"{{{text!r}: ...}}; {said}, and so do infer_auto_device_map, load_checkpoint_and_dispatch "
                    f"and from_pretrained.")
        plain = text.strip().lower()
        if plain in ("cpu", "disk", "mps") or plain.isdigit():
            fixed = int(plain) if plain.isdigit() else plain
            return f"max_memory key {key!r}: write {fixed!r} instead; {said}."
    return f"max_memory key {key!r} is not a device: use GPU ids (0, 1, ...), 'mps', 'cpu' or 'disk'; {said}."


def _key_not_meant(key) -> None:
    """Refuse the keys accelerate takes as GPU ids though they cannot be meant: booleans, negative ids."""
    if isinstance(key, bool):
        raise ValueError(f"max_memory key {key!r} is a boolean, not a device (accelerate would take it as GPU "
                         f"{int(key)}): use GPU ids (0, 1, ...), 'cpu' or 'disk'.")
    if isinstance(key, int) and key < 0:
        raise ValueError(f"max_memory key {key} is not a GPU id: ids count from 0 (use 0, 1, ...).")


def _value_not_meant(key, value) -> None:
    """Refuse the values accelerate keeps as they are though they cannot be meant (it reads only strings)."""
    where = f"max_memory[{key!r}] = {value!r}"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{where} is a boolean, not a size (accelerate would read True as 1 byte): give bytes "
                         f"(an int) or a string such as '35GiB'.")
    if isinstance(value, str):
        return
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{where} is not a size: give bytes (an int) or a string such as '35GiB' (2**30 bytes "
                         f"each) or '500MB' (10**6 bytes each).")
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


def _refused(max_memory: Mapping, error: Exception) -> ValueError:
    """A ValueError naming the entry accelerate's ``get_max_memory`` refused (``error``) and the fix.

    accelerate converts every size string first, then checks the keys: each entry is asked
    alone, in that order, to find the one it refuses. accelerate's own message is quoted whole.
    """
    for key, value in max_memory.items():
        if isinstance(value, str):
            try:
                _accelerate_reads({"cpu": value})
            except (ValueError, OverflowError) as e:  # "infGB" overflows inside accelerate
                return ValueError(
                    f"max_memory[{key!r}] = {value!r} is not a size: accelerate's get_max_memory refuses it "
                    f"({type(e).__name__}: {e}). Give bytes (an int) or a string such as '35GiB' (2**30 bytes "
                    f"each) or '500MB' (10**6 bytes each); accelerate refuses 'TB', a bare 'G' or 'B', spaces after "
                    f"the unit and negative sizes.")
    for key in max_memory:
        try:
            _accelerate_reads({key: 0})
        except ValueError as e:
            fix = _refused_key(key, e)
            if fix:
                return ValueError(fix)
    return ValueError(f"max_memory {dict(max_memory)!r}: accelerate's get_max_memory refuses it "
                      f"({type(error).__name__}: {error}).")


def _bits_warning(key, value: str, n: int, stacklevel: int) -> None:
    """Warn when accelerate read a size string as bits: a lowercase final "b" after G, M or K."""
    upper = value.upper()
    if value.endswith("b") and upper.endswith(("GB", "MB", "KB")) and not upper.endswith(("GIB", "MIB", "KIB")):
        num, letter = value[:-2], value[-2].upper()
        _warn(f"max_memory[{key!r}] = {value!r} is read by accelerate as {letter}-bits (a lowercase final 'b' after "
              f"G, M or K means bits): {n:,} bytes, 1/8 of '{num}{letter}B'. Write '{num}{letter}B' ({num} x 10**"
              f"{ {'G': 9, 'M': 6, 'K': 3}[letter]} bytes) or '{num}{letter}iB' ({num} x 2**"
              f"{ {'G': 30, 'M': 20, 'K': 10}[letter]} bytes).", stacklevel + 1)


def _parse(max_memory, strategy: str | None, stacklevel: int) -> dict:
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {(None,) + STRATEGIES}, not {strategy!r}.")
    if max_memory is None:
        return {}
    if not isinstance(max_memory, Mapping):
        said = ""
        try:  # on a copy: accelerate writes into what it is given
            arg = copy.copy(max_memory)
        except Exception:  # noqa: BLE001 - not even copyable: accelerate is not asked
            arg = None
        if arg is not None:
            try:
                get_max_memory(arg)
            except Exception as e:  # noqa: BLE001 - whatever accelerate raises is quoted, then refused
                said = f" (accelerate's get_max_memory fails with {type(e).__name__}: {e})"
        example = repr(max_memory) if isinstance(max_memory, (str, bytes, numbers.Number)) else "'35GiB'"
        raise ValueError(
            f"max_memory must be a dict {{device: size}}, not {max_memory!r}{said}: write max_memory={{0: {example}}} "
            f"for GPU 0 (one entry per GPU, plus 'cpu' for offloading), e.g. {{0: {example}, 'cpu': '30GiB'}}.")
    for key, value in max_memory.items():  # what accelerate takes but cannot be meant
        _key_not_meant(key)
        _value_not_meant(key, value)
    try:
        read = _accelerate_reads(max_memory)
    except (ValueError, OverflowError) as e:
        raise _refused(max_memory, e) from e
    out = {key: int(read[key]) for key in max_memory}  # accelerate's numbers, in the order given
    for key, value in max_memory.items():
        if isinstance(value, str):
            _bits_warning(key, value, out[key], stacklevel + 1)
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
    """Read a ``max_memory`` dict with accelerate's ``get_max_memory``, and check it: {device: bytes}.

    Keys: GPU ids (ints 0, 1, ...), ``"mps"``, ``"cpu"``, ``"disk"``: what
    accelerate's ``get_max_memory`` accepts. Values: bytes (an int or a
    float) or size strings, read by accelerate (``convert_file_size_to_int``):
    "35GiB" is 35 * 2**30 bytes, "500MB" is 500 * 10**6. The numbers are
    accelerate's own: ``get_max_memory`` runs on a copy, so the dict passed in
    is never changed (accelerate converts the strings in place).

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
        ValueError, naming the fix and quoting accelerate's own error whole,
            where accelerate refuses or crashes: ``max_memory`` not a dict (a
            string "10GB": accelerate fails with TypeError); a key "cuda:0"
            (or "xpu:0", "gpu"): use the id ``0``; a key that is not a device;
            a value that is not a size. With ``strategy="balanced_low_0"``,
            GPU ids that skip one (``{0: X, 2: X}``: KeyError: 1 inside
            accelerate's ``get_balanced_memory``). And where a key or value
            cannot be meant though accelerate takes it: boolean or negative
            keys; negative, boolean, infinite or NaN budgets. Also an unknown
            ``strategy``.

    Warns:
        :class:`BudgetWarning` where accelerate silently accepts something
        that is probably a mistake: sizes in bits ("10Gb", "10gb", "10mb": a
        lowercase final "b" after G/M/K means bits, 1/8 of the bytes; "24Gib"
        is GiB, not bits) and a budget of 0 on a GPU (with "balanced_low_0" a 0
        on GPU 1 sends everything to GPU 0).

    Notebook 03 explains how ``max_memory`` is read; notebook 08 troubleshoots
    bad budgets.
    """
    return _parse(max_memory, strategy, stacklevel=stacklevel + 1)
