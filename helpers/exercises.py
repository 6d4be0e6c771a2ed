"""Exercises: the self-check that ends each notebook, right, wrong or not answered yet.

Each notebook's exercises leave a variable at None for the learner to fill in; the check cell prints
a verdict with an explanation and never fails, so CI can run it unanswered. Notebooks 00 to 08 use it.
"""

from __future__ import annotations

from typing import Any, Callable

from .text import wrap


def check_answer(answer: Any, expected: Any, right: str | Callable[[Any], str], wrong: str | Callable[[Any], str],
                 not_yet: str = "", *, wrong_example: Any, label: str = "") -> str | None:
    """Print the verdict on ``answer`` and return it: ``"right"``, ``"wrong"``, or None when not answered.

    ``answer is None`` prints ``not answered yet: <not_yet>`` (the hint). Otherwise the answer is right
    when it equals ``expected``, or, when ``expected`` is a callable, when ``expected(answer)`` is true
    (for answers with a tolerance), and ``right: <right>`` or ``wrong: <wrong>`` is printed. ``right`` and
    ``wrong`` are strings, or callables given the answer that return the string (called only for the
    verdict printed). ``label`` (e.g. ``"Exercise 1"``) starts the line, followed by a colon. A long
    verdict is wrapped at words to fit a JupyterLab output line (:func:`helpers.text.wrap`).
    Never raises for a wrong answer. Used by the exercise checks of notebooks 00 to 08.

    ``wrong_example`` (required) is a plausible wrong answer, the mistake a learner is likely to make.
    The check must call it wrong, so every check can say "wrong" (a check that accepts anything
    teaches nothing): each notebook run tests its own checks this way.

    Raises:
        ValueError: the check accepts ``wrong_example``, or ``wrong_example`` is None.
    """
    if wrong_example is None or _accepts(expected, wrong_example):
        raise ValueError(f"this exercise check accepts the wrong answer {wrong_example!r}: make the check stricter")
    if answer is None:
        verdict, message = "not answered yet", not_yet
    else:
        ok = _accepts(expected, answer)
        verdict, message = ("right", right) if ok else ("wrong", wrong)
        message = message(answer) if callable(message) else message
    line = f"{verdict}: {message}" if message else f"{verdict}."
    print(wrap(f"{label}: {line}" if label else line))
    return None if answer is None else verdict


def _accepts(expected: Any, answer: Any) -> bool:
    """Whether ``answer`` passes: ``expected(answer)`` for a callable, else equality."""
    return bool(expected(answer) if callable(expected) else answer == expected)
