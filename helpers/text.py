"""Printed text that fits JupyterLab's output area: long lines wrapped at whole words.

JupyterLab 4.6 wraps a long line of stdout at the output area's edge and breaks it anywhere, even
inside a word (its CSS says ``word-break: break-all``), so ``weights`` can read ``wei`` / ``ghts``.
In its default layout (file browser open) in a 1280 x 900 window, the output area is 848 CSS px
wide and holds 107 characters of its 13 px monospace font on a line: :data:`LINE_WIDTH`. Text
the notebooks print goes through :func:`wrap` (directly, or through :mod:`helpers.preflight`,
:mod:`helpers.planner`, :mod:`helpers.refusals`, :mod:`helpers.reference` and
:mod:`helpers.exercises`), so no line is longer. Used by notebooks 00 to 08.
"""

from __future__ import annotations

import re
import textwrap

LINE_WIDTH = 107
"""Characters on one line of stdout in JupyterLab 4.6 (default layout, 1280 x 900 window, 848 px output area)."""


def _hanging(line: str) -> str:
    """The indent of a wrapped line's continuation: its own indent, plus a list marker's width or 2."""
    m = re.match(r"( *)(\d+\. |- |\* |\[[\w-]+\] )?", line)
    return m.group(1) + (" " * len(m.group(2)) if m.group(2) else "  ")


def wrap(text: str, width: int = LINE_WIDTH) -> str:
    """``text`` with every line longer than ``width`` characters wrapped at spaces.

    A line that fits is kept exactly (indentation and column alignment included). A longer one
    is broken between words; its continuation lines are indented like the line, plus the width
    of a leading list marker (``1. ``, ``- ``) or 2 spaces. A single word longer than a line is
    cut. Returns the wrapped text (a str, lines joined by ``\\n``). Used by notebooks 00 to 08.
    """
    out = []
    for line in str(text).split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        lead = line[: len(line) - len(line.lstrip(" "))]
        out.append(textwrap.fill(line[len(lead):], width, initial_indent=lead, subsequent_indent=_hanging(line),
                                 break_on_hyphens=False, replace_whitespace=False))
    return "\n".join(out)


def say(*parts: object, sep: str = " ", width: int = LINE_WIDTH) -> None:
    """``print(*parts, sep=sep)``, with the text wrapped by :func:`wrap` at ``width`` characters. Notebooks 00 to 08."""
    print(wrap(sep.join(str(p) for p in parts), width))
