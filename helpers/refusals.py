"""Refusals: run a call that should fail, show its error as `Type: message`, and hand the error back.

The notebooks show many library refusals on purpose (a wrong budget, a tie lost before loading, an
offloaded model moved). Each cell keeps the library call it teaches, in a lambda, and this module
does the catching and printing that was the same in every such cell. Used by notebooks 03 and 06.
"""

from __future__ import annotations

from typing import Callable

from .text import wrap


def refused(call: Callable[[], object], *errors: type[BaseException], width: int | None = None,
            label: str = "") -> BaseException | None:
    """Run ``call()`` (no arguments, e.g. a lambda) and show the error it raises, if it is one of ``errors``.

    Prints ``Type: message`` (``label`` first, then a space, when given: ``label="generate ->"``).
    ``width=None`` prints the whole message; a number prints only its first line, cut at that many
    characters with ``...`` after a cut (notebook 06 quotes long library messages this way). Lines
    longer than a JupyterLab output line are wrapped at words (:func:`helpers.text.wrap`).
    Returns the exception when one of ``errors`` was raised, and None (printing nothing) when the call
    returned normally. Any other exception propagates, so an unexpected failure still stops the cell.
    ``errors`` defaults to ``Exception``. Notebooks 03 and 06 show the library's refusals with it.
    """
    try:
        call()
    except errors or (Exception,) as e:
        message = str(e)
        if width is not None:
            first = message.strip().splitlines()[0] if message.strip() else ""
            message = first[:width] + ("..." if len(first) > width else "")
        text = f"{type(e).__name__}: {message}"
        print(wrap(f"{label} {text}" if label else text))
        return e
    return None
