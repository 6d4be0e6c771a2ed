"""The project's own consistency: notebook sources, stored outputs, nbval settings.

Versions and dependencies: tests/test_versions.py.
"""

import json
from pathlib import Path

import pytest

from helpers.text import LINE_WIDTH, wrap

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_every_notebook_source_has_its_notebook_and_back():
    """The tests below go over the .ipynb files: a source without one (or the reverse) would escape them."""
    sources = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py")}
    stored = {p.stem for p in NOTEBOOKS}
    assert sources == stored, (f"sources without a notebook (./workbook.sh outputs makes it): "
                               f"{sorted(sources - stored)}; notebooks without a source: {sorted(stored - sources)}")
    assert len(stored) >= 2


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_source(ipynb):
    import jupytext

    source = jupytext.read(ipynb.with_suffix(".py"))
    stored = json.loads(ipynb.read_text())
    got = [(c["cell_type"], "".join(c["source"])) for c in stored["cells"]]
    want = [(c.cell_type, c.source) for c in source.cells]
    assert got == want, f"{ipynb.name} is out of date: run ./workbook.sh outputs {ipynb.relative_to(ROOT)}"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_parameters_cell_and_outputs(ipynb):
    nb = json.loads(ipynb.read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and 'MODEL = "bundled"' in "".join(params[0]["source"])
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code if c["outputs"]), "outputs without a count"
    assert "widgets" not in nb["metadata"], "widget state must be stripped"
    for c in code:
        src = "".join(c["source"]).splitlines()
        for i, line in enumerate(src):
            if line.strip() in ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP"):
                assert i + 1 < len(src) and src[i + 1].startswith("# ") and len(src[i + 1]) > 6, \
                    f"{ipynb.name}: {line.strip()} needs a reason on the next comment line"


def test_sanitize_file_pairs():
    lines = [line for line in (ROOT / "tests/nbval_sanitize.cfg").read_text().splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith("[")]
    assert len(body) % 2 == 0
    for regex, replace in zip(body[::2], body[1::2]):
        assert regex.startswith("regex: ") and replace.startswith("replace: ") and replace[len("replace: "):]


def test_main_job_parameters_are_injected_after_the_parameters_cell():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from execute import parameterize

    nb = parameterize(NOTEBOOKS[0], {"MODEL": "/tmp/other-model"})
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    i = next(k for k, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[i + 1]
    assert "MODEL = \"/tmp/other-model\"" in nb.cells[i + 1].source


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_hides_its_value_with_a_semicolon(ipynb):
    """nbval's kernel keeps no input history, so IPython cannot see a trailing ';' there and shows the value
    the stored run hid: assign it to _ instead."""
    nb = json.loads(ipynb.read_text())
    for i, c in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        lines = "".join(c["source"]).rstrip().splitlines()
        assert not (lines and lines[-1].rstrip().endswith(";")), f"{ipynb.name}: code cell {i} ends with ';'"


# JupyterLab 4.6 in its default layout (file browser open) in a 1280 x 900 window (tests/browser.py's
# VIEWPORT, one CSS px per pixel): the output area is 848 CSS px wide and holds 107 characters of its
# 13 px monospace font on a line (measured with Playwright in headless Chromium). A longer line wraps
# mid-word there (word-break: break-all). helpers.text.LINE_WIDTH is that figure, written once.
OUTPUT_LINE_CHARS = LINE_WIDTH


def stored_text(ipynb):
    """(cell index, what, text) of every stream output and text/plain result shown as text (no html, no image)."""
    nb = json.loads(ipynb.read_text())
    for i, c in enumerate(nb["cells"]):
        for o in c.get("outputs", []):
            if o["output_type"] == "stream":
                yield i, o["name"], "".join(o["text"])
            elif "data" in o and not {"text/html", "image/png", "image/jpeg", "image/svg+xml"} & set(o["data"]):
                if "text/plain" in o["data"]:
                    yield i, "text/plain", "".join(o["data"]["text/plain"])


def test_wrap_fits_the_output_width_and_keeps_every_word_whole():
    long = "1. [kind] " + " ".join(f"word{i}" for i in range(60))
    table = "GPU 0    12.3 GiB    layers 0-4"  # a line that fits keeps its spacing
    text = wrap(long + "\n" + table + "\n   fix: " + "other " * 40)
    lines = text.splitlines()
    assert len(lines) > 4 and all(len(line) <= OUTPUT_LINE_CHARS for line in lines)
    assert text.split() == (long + " " + table + " fix: " + "other " * 40).split(), "no word is cut or lost"
    assert lines[1].startswith("   word") and table in lines  # continuation under the text, after "1. "


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_printed_lines_fit_jupyterlab_output_width(ipynb):
    """Every stored line fits one line of JupyterLab's output area, so none is broken inside a word."""
    long = [f"cell {i} ({what}) line {n}: {len(line)} chars: {line[:60]}..."
            for i, what, text in stored_text(ipynb) for n, line in enumerate(text.splitlines())
            if len(line) > OUTPUT_LINE_CHARS
            and not (what == "stderr" and line.strip() in EXPLAINED_STDERR)]  # a library's words, explained beside
    assert not long, (f"{ipynb.name}: lines longer than {OUTPUT_LINE_CHARS} characters (wrap them, e.g. with "
                      "helpers.text.say, or shorten them):\n" + "\n".join(long))


# Every message a committed notebook may hold on stderr, with the words that explain it. Each is either
# silenced in code (helpers.quiet) or explained beside it: the explanation must be in the cell's own
# source (a comment) or in the markdown cell just before it.
EXPLAINED_STDERR = {
    "The model weights are not tied. Please use the `tie_weights` method before using the "
    "`infer_auto_device` function.": "The model weights are not tied",  # accelerate notices a lost tie
    "You shouldn't move a model that is dispatched using accelerate hooks.": "You shouldn't move a model",
}


@pytest.mark.library_text  # EXPLAINED_STDERR holds accelerate's own words: re-check them on an upgrade
@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_stderr_is_silenced_or_explained(ipynb):
    cells = json.loads(ipynb.read_text())["cells"]
    problems = []
    for i, what, text in stored_text(ipynb):
        if what != "stderr":
            continue
        beside = "".join(cells[i]["source"]) + ("".join(cells[i - 1]["source"]) if i else "")
        for line in text.strip().splitlines():
            words = EXPLAINED_STDERR.get(line.strip())
            if words is None:
                problems.append(f"cell {i}: {line!r} is not in EXPLAINED_STDERR (silence it in helpers.quiet, "
                                "or explain it beside the cell and list it)")
            elif words not in beside:
                problems.append(f"cell {i}: {line!r} is not explained in the cell or the markdown before it")
    assert not problems, f"{ipynb.name}:\n" + "\n".join(problems)
