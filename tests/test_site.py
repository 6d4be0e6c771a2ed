"""The course site (tools/site.py) rendered from the committed notebooks: pages, links, images, order.

The ``site`` fixture (tests/site_pages.py) renders it once a session, without executing anything.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import nbformat
import pytest

from tests.site_pages import NOTEBOOKS, ROOT, Page
from tools.site import STORED, course_map, lessons, notebook_title, render_index


def pages(site: Path) -> list[Path]:
    return sorted(site.glob("*.html"))


def external_links_in_prose() -> set[str]:
    """Every absolute http(s) link written in the notebooks' markdown (the only ones a page may have)."""
    found = set()
    for ipynb in NOTEBOOKS:
        for cell in nbformat.read(ipynb, as_version=4).cells:
            if cell.cell_type == "markdown":
                found.update(re.findall(r"https?://[^\s)\]>\"']+", cell.source))
    return found


def test_every_notebook_has_a_page_and_the_index_lists_it(site):
    index = Page(site / "index.html")
    for ipynb in NOTEBOOKS:
        page = ipynb.with_suffix(".html").name
        assert (site / page).is_file(), f"no page for {ipynb.name}"
        assert page in index.hrefs, f"index.html does not link {page}"
    assert {p.name for p in pages(site)} == {"index.html"} | {n.with_suffix(".html").name for n in NOTEBOOKS}


def test_every_relative_link_resolves_to_a_file_and_anchor(site):
    parsed = {path: Page(path) for path in pages(site)}
    for path, page in parsed.items():
        for href in page.hrefs:
            if href.startswith(("http://", "https://")):
                continue
            assert not re.match(r"^[a-z][a-z0-9+.-]*:|^/", href), f"{path.name}: not a relative link: {href}"
            target, _, anchor = href.partition("#")
            target_path = site / target if target else path
            assert target_path in parsed, f"{path.name}: {href} points at no page of the site"
            if anchor:
                assert anchor in parsed[target_path].ids, f"{path.name}: {href} points at no anchor"


def test_pages_load_nothing_and_link_nothing_outside_the_site_but_the_prose_links(site):
    allowed = external_links_in_prose()
    for path in pages(site):
        page = Page(path)
        for tag, src in page.sources:
            assert src.startswith("data:"), f"{path.name}: <{tag}> loads {src[:80]} (a page must load nothing)"
        for href in page.hrefs:
            if href.startswith(("http://", "https://")):
                assert href in allowed, f"{path.name}: {href} is not a link of the notebooks' prose"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_is_an_embedded_image_with_data(site, ipynb):
    figures = sum("image/png" in out.get("data", {})
                  for cell in nbformat.read(ipynb, as_version=4).cells if cell.cell_type == "code"
                  for out in cell.outputs)
    images = Page(site / ipynb.with_suffix(".html").name).images
    assert len(images) == figures, f"{ipynb.name}: {figures} figures, {len(images)} <img> on its page"
    for src in images:
        kind, _, data = src.partition(";base64,")
        assert kind == "data:image/png" and len(base64.b64decode(data)) > 1000, f"{ipynb.name}: an empty image"


def test_previous_and_next_links_chain_every_page_in_order(site):
    order = [n.with_suffix(".html").name for n in NOTEBOOKS]
    for i, name in enumerate(order):
        navs = Page(site / name).navs
        assert len(navs) == 2, f"{name}: wants a navigation bar at its top and at its bottom"
        for nav in navs:
            assert nav.get("index") == "index.html"
            assert nav.get("prev") == (order[i - 1] if i > 0 else None), f"{name}: previous link"
            assert nav.get("next") == (order[i + 1] if i + 1 < len(order) else None), f"{name}: next link"


def test_index_shows_readme_facts_and_stored_status(site):
    text = (site / "index.html").read_text(encoding="utf-8")
    for lesson in lessons(NOTEBOOKS):
        assert lesson.status == STORED and lesson.stated_time and lesson.stated_time in text
        assert html.escape(lesson.title) in text
    assert text.count(f">{STORED}<") == len(NOTEBOOKS)


def test_readme_course_map_agrees_with_the_notebooks():
    """README's course map is where the index reads what you learn, hardware and run time."""
    rows = course_map()
    assert sorted(rows) == [n.name for n in NOTEBOOKS], "README's course map must list every notebook once"
    for ipynb in NOTEBOOKS:
        row = rows[ipynb.name]
        assert row["number"] == ipynb.name[:2]
        title = notebook_title(nbformat.read(ipynb, as_version=4))
        assert title.startswith(row["title"]), f"README calls {ipynb.name} {row['title']!r}; it says {title!r}"
        assert row["learn"] and row["hardware"] and re.search(r"\d", row["time"])


def test_index_of_a_run_shows_its_status_and_seconds():
    runs = {NOTEBOOKS[0].name: ("ok", 14.6), NOTEBOOKS[1].name: ("FAILED", 3.2)}
    text = render_index(lessons(NOTEBOOKS[:2], runs), measured=True)
    assert "run time (this run)" in text and ">15 s<" in text and ">3 s<" in text
    assert 'class="status-ok">ok<' in text and 'class="status-FAILED">FAILED<' in text
    assert STORED not in text


@pytest.mark.subprocess
def test_the_command_line_renders_from_the_committed_notebooks(tmp_path):
    """``python tools/site.py --out DIR``, on one notebook to keep it quick."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "tools" / "site.py"), "--out", str(tmp_path), str(NOTEBOOKS[0])],
                   check=True, capture_output=True, cwd=ROOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index.html", NOTEBOOKS[0].with_suffix(".html").name])
