"""Refusals: run a call that should fail, show its whole error as `Type: message`, and hand the error back.

The notebooks show many library refusals on purpose (a wrong budget, a tie lost before loading, an
offloaded model moved). Each cell keeps the library call it teaches, in a lambda, and this module
does the catching and printing that was the same in every such cell. A refusal is shown whole,
wrapped at words, never cut: the remedy a message names is often at its end. Used by notebooks 03 and 08.
"""

from __future__ import annotations

from typing import Callable

from .text import LINE_WIDTH, wrap


def refused(call: Callable[[], object], *errors: type[BaseException], width: int | None = None,
            label: str = "") -> BaseException | None:
    """Run ``call()`` (no arguments, e.g. a lambda) and show the error it raises, if it is one of ``errors``.

    Prints ``Type: message`` (``label`` first, then a space, when given: ``label="generate ->"``), the
    whole message, every line of it, wrapped at words to fit a JupyterLab output line
    (:func:`helpers.text.wrap`). ``width`` is the line width to wrap at (at most, and by default,
    :data:`helpers.text.LINE_WIDTH`); it never cuts the message.
    Returns the exception when one of ``errors`` was raised, and None (printing nothing) when the call
    returned normally. Any other exception propagates, so an unexpected failure still stops the cell.
    ``errors`` defaults to ``Exception``. Notebooks 03 and 08 show the library's refusals with it.
    """
    try:
        call()
    except errors or (Exception,) as e:
        text = f"{type(e).__name__}: {e}"
        print(wrap(f"{label} {text}" if label else text, min(width or LINE_WIDTH, LINE_WIDTH)))
        return e
    return None
