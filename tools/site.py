"""Render a folder of executed notebooks into a browsable course: an index page and one page each.

The index (``index.html``) has the workbook's title, its opening paragraph and the course map: for each
notebook its number, its title (a link to its page), what you learn, the hardware it needs, its run
time and its status. Each notebook page is nbconvert's HTML rendering (figures are embedded PNGs)
with a navigation bar at its top and bottom: previous, index, next. Links are relative, and the
pages load nothing from the network, so the site works opened from the file system or served.

Where the facts come from (each is written in one place only):

- the title: the notebook's own first heading;
- what you learn, hardware, stated run time: README.md's course-map table, the short form of each
  notebook's "What you'll learn" and "What you'll need" (tests/test_site.py checks that the table
  lists every notebook, links it and agrees with its title);
- status and measured run time: the run that executed the notebooks (``tools/execute.py``, the main
  job, passes them); without a run, the status says the pages show the stored outputs.

Used by ``tools/execute.py`` after it executes (``build/index.html`` beside the executed notebooks),
and on its own, without executing, from the committed notebooks:

    python tools/site.py --out build/site
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
STORED = "stored outputs"  # the status of a page rendered without executing

# nbconvert's lab template, less the scripts it would fetch from a CDN (require.js, MathJax, mermaid:
# the notebooks use none of them), plus the navigation bar at the top and the bottom of the page.
PAGE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock %}
{% block html_head_js_mathjax %}{% endblock %}
{% block html_head_js_mermaidjs %}{% endblock %}
{% block extra_css %}<style type="text/css">{{ resources.site_css }}</style>{% endblock %}
{% block body_header %}{{ super() }}{{ resources.site_nav_top }}{% endblock %}
{% block body_footer %}{{ resources.site_nav_bottom }}{{ super() }}{% endblock %}
"""

NAV_CSS = """
nav.site-nav { display: flex; justify-content: space-between; align-items: center; gap: 1em;
  font: 15px/1.4 system-ui, sans-serif; padding: 0.6em 1em; margin: 0 0 1em 0;
  background: #f3f5f8; border: 1px solid #d5dbe3; border-radius: 6px; }
nav.site-nav a { color: #1a5fb4; text-decoration: none; }
nav.site-nav a:hover { text-decoration: underline; }
nav.site-nav .prev, nav.site-nav .next { flex: 1; }
nav.site-nav .next { text-align: right; }
nav.site-nav .none { color: #888; }
p.site-facts { font: 14px/1.4 system-ui, sans-serif; color: #444; margin: 0 1em 1em 1em; }
"""

INDEX_CSS = """
body { font: 16px/1.5 system-ui, sans-serif; color: #1d1d1d; max-width: 1200px; margin: 2em auto;
  padding: 0 1.5em; }
h1 { font-size: 1.9em; margin-bottom: 0.4em; }
p.intro { font-size: 1.05em; max-width: 60em; }
table.course-map { border-collapse: collapse; width: 100%; margin-top: 1.2em; }
table.course-map th, table.course-map td { border: 1px solid #d5dbe3; padding: 0.5em 0.7em;
  vertical-align: top; text-align: left; }
table.course-map th { background: #eef1f5; white-space: nowrap; }
table.course-map tbody tr:nth-child(even) { background: #f8f9fb; }
table.course-map td.num { font-weight: 600; white-space: nowrap; }
table.course-map td.title { min-width: 12em; font-weight: 600; }
table.course-map td.learn { font-size: 0.9em; }
table.course-map td.hardware { font-size: 0.9em; min-width: 12em; }
table.course-map td.time, table.course-map td.status { white-space: nowrap; }
table.course-map a { color: #1a5fb4; }
code { background: #f0f2f4; padding: 0 0.2em; border-radius: 3px; font-size: 0.92em; }
.status-ok { color: #1b7c32; font-weight: 600; }
.status-FAILED { color: #c01c28; font-weight: 700; }
.status-stored { color: #555; }
p.made { color: #555; font-size: 0.9em; margin-top: 1.5em; }
"""


@dataclass
class Lesson:
    """One notebook of the course: what the index and the navigation say about it."""

    ipynb: Path  # the executed (or committed) notebook
    number: str  # "00"
    title: str  # the notebook's first heading
    learn: str = ""  # README's "you learn" cell (markdown)
    hardware: str = ""  # README's "hardware" cell (markdown)
    stated_time: str = ""  # README's run-time cell, e.g. "about 15 s"
    status: str = STORED  # "ok", "FAILED" or STORED
    seconds: float | None = None  # measured by the run, None without one

    @property
    def page(self) -> str:
        """The file name of the lesson's page, relative to the site's folder."""
        return self.ipynb.with_suffix(".html").name

    @property
    def run_time(self) -> str:
        """The measured run time where the notebook was executed, else the one README states."""
        return f"{self.seconds:.0f} s" if self.seconds is not None else self.stated_time


def notebook_title(nb: nbformat.NotebookNode) -> str:
    """The text of the notebook's first level-1 heading (its title)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found = re.search(r"^# (.+)$", cell.source, re.MULTILINE)
            if found:
                return found.group(1).strip()
    raise ValueError("the notebook has no '# Title' heading")


def readme_intro(readme: Path = README) -> tuple[str, str]:
    """README's title and its first paragraph (markdown), as the index's heading and introduction."""
    text = readme.read_text(encoding="utf-8")
    title = re.search(r"^# (.+)$", text, re.MULTILINE).group(1).strip()
    paragraph = text.split(f"# {title}\n", 1)[1].strip().split("\n\n", 1)[0]
    return title, " ".join(paragraph.split())


def course_map(readme: Path = README) -> dict[str, dict[str, str]]:
    """README's course-map table, by notebook file name: title, learn, hardware, time (markdown cells)."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Course map", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not re.match(r"\| \d\d \|", line):
            continue  # the header, the separator and the prose around the table
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and re.fullmatch(r"\*[^*]+\*.*", cells[1]):
            continue  # a number kept for a notebook not written yet (its title in italics, no link)
        number, notebook, learn, hardware, time = cells
        link = re.fullmatch(r"\[(.+)\]\((?:notebooks/)?([^)]+\.ipynb)\)", notebook)
        if link is None:
            raise ValueError(f"README's course map: row {number} does not link its notebook: {notebook}")
        rows[link.group(2)] = {"number": number, "title": link.group(1), "learn": learn,
                               "hardware": hardware, "time": time}
    return rows


def lessons(notebooks: list[Path], runs: dict[str, tuple[str, float]] | None = None) -> list[Lesson]:
    """The lessons of these notebooks, in order, with README's facts and the run's status and seconds.

    ``runs`` maps a notebook's file name to ``(status, seconds)`` from the run that executed it; a
    notebook missing from it (or ``runs=None``) shows its stored outputs.
    """
    facts = course_map()
    found = []
    for ipynb in sorted(notebooks, key=lambda p: p.name):
        nb = nbformat.read(ipynb, as_version=4)
        row = facts.get(ipynb.name, {})
        status, seconds = (runs or {}).get(ipynb.name, (STORED, None))
        found.append(Lesson(
            ipynb=ipynb, number=ipynb.name[:2], title=notebook_title(nb),
            learn=row.get("learn", ""), hardware=row.get("hardware", ""), stated_time=row.get("time", ""),
            status=status, seconds=seconds))
    return found


def inline_markdown(source: str) -> str:
    """A README table cell or paragraph (markdown) as inline HTML: code, bold and links."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    rendered = markdown2html_mistune(source).strip()
    return re.sub(r"^<p>(.*)</p>$", r"\1", rendered, flags=re.DOTALL)


def status_html(status: str) -> str:
    """The status as a coloured word: ok, FAILED, or that the outputs are the stored ones."""
    css = "stored" if status == STORED else status
    return f'<span class="status-{html.escape(css)}">{html.escape(status)}</span>'


def nav_bar(previous: Lesson | None, following: Lesson | None, where: str) -> str:
    """The navigation bar of a page: previous lesson, the index (course map), next lesson."""
    def link(lesson: Lesson | None, rel: str, label: str) -> str:
        if lesson is None:
            return f'<span class="{rel} none">{label}: none</span>'
        text = f"{lesson.number} {html.escape(lesson.title)}"
        text = f"&larr; {text}" if rel == "prev" else f"{text} &rarr;"
        return f'<a class="{rel}" rel="{rel}" href="{html.escape(lesson.page)}">{text}</a>'

    return (f'<nav class="site-nav site-nav-{where}" aria-label="course navigation">'
            f'{link(previous, "prev", "previous")}'
            f'<a class="index" href="index.html">Course map</a>'
            f'{link(following, "next", "next")}</nav>')


def render_page(exporter, lesson: Lesson, previous: Lesson | None, following: Lesson | None) -> str:
    """One lesson's page: nbconvert's rendering of the notebook between two navigation bars."""
    nb = nbformat.read(lesson.ipynb, as_version=4)
    facts = (f'<p class="site-facts">Notebook {lesson.number} &middot; status: {status_html(lesson.status)}'
             f' &middot; run time: {html.escape(lesson.run_time or "not stated")}'
             f' &middot; hardware: {inline_markdown(lesson.hardware) if lesson.hardware else "see below"}</p>')
    resources = {
        "metadata": {"name": f"{lesson.number} {lesson.title}"},
        "site_css": NAV_CSS,
        "site_nav_top": nav_bar(previous, following, "top") + facts,
        "site_nav_bottom": nav_bar(previous, following, "bottom"),
    }
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return body


def render_index(course: list[Lesson], measured: bool) -> str:
    """The index page: README's title and first paragraph, then the course map of these lessons."""
    title, intro = readme_intro()
    time_heading = "run time (this run)" if measured else "run time (2-core CPU)"
    rows = []
    for lesson in course:
        rows.append(
            "<tr>"
            f'<td class="num">{lesson.number}</td>'
            f'<td class="title"><a href="{html.escape(lesson.page)}">{html.escape(lesson.title)}</a></td>'
            f'<td class="learn">{inline_markdown(lesson.learn)}</td>'
            f'<td class="hardware">{inline_markdown(lesson.hardware)}</td>'
            f'<td class="time">{html.escape(lesson.run_time)}</td>'
            f'<td class="status">{status_html(lesson.status)}</td>'
            "</tr>")
    made = ("Status and run times are those of the run that executed these notebooks."
            if measured else
            "These pages show the notebooks' stored (committed) outputs; nothing was executed to make "
            "them. Run times are those README.md states for an idle 2-core CPU.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<style type="text/css">{INDEX_CSS}</style>
</head>
<body>
<main>
<h1>{html.escape(title)}</h1>
<p class="intro">{inline_markdown(intro)}</p>
<table class="course-map">
<thead><tr><th>#</th><th>notebook</th><th>you learn</th><th>hardware</th><th>{time_heading}</th>
<th>status</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<p class="made">{made} Notebooks are meant to be followed in order; each page has links to the
previous and the next one at its top and bottom.</p>
</main>
</body>
</html>
"""


def render_site(notebooks: list[Path], out: Path, runs: dict[str, tuple[str, float]] | None = None) -> list[Path]:
    """Write ``index.html`` and one page per notebook (``NN_slug.html``) into ``out``; return the files.

    ``notebooks`` are executed notebooks (the main job's copies in build/, or the committed ones);
    ``runs`` maps a notebook's file name to ``(status, seconds)`` from the run that executed it
    (``None``: nothing was executed, each page shows its stored outputs).
    """
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="site_page.html.j2",
                            extra_loaders=[jinja2.DictLoader({"site_page.html.j2": PAGE_TEMPLATE})])
    out.mkdir(parents=True, exist_ok=True)
    course = lessons(notebooks, runs)
    written = []
    for i, lesson in enumerate(course):
        previous = course[i - 1] if i > 0 else None
        following = course[i + 1] if i + 1 < len(course) else None
        page = out / lesson.page
        page.write_text(render_page(exporter, lesson, previous, following), encoding="utf-8")
        written.append(page)
    index = out / "index.html"
    index.write_text(render_index(course, measured=runs is not None), encoding="utf-8")
    return [index] + written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="notebooks to render (default: every notebooks/NN_*.ipynb)")
    ap.add_argument("--out", default="build/site", help="output folder (default: build/site)")
    args = ap.parse_args()
    paths = [Path(n).resolve() for n in args.notebooks] or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    written = render_site(paths, out)
    print(f"site: {written[0]} and {len(written) - 1} notebook pages (stored outputs, not executed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
