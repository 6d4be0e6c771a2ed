"""The course site in a real browser: served over HTTP and opened from the file system.

The site is rendered once a session from the committed notebooks (the ``site`` fixture,
tests/site_pages.py) and served by Python's ``http.server`` on 127.0.0.1. The test follows every
link of every page: the site's own must answer 200; absolute http(s) links (the notebooks' further
reading) are listed, never fetched, and any request that would leave 127.0.0.1 is blocked and fails
the test. Screenshots land in build/browser/site/.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest

from tests.browser import SHOTS
from tests.site_pages import NOTEBOOKS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ORDER = [n.with_suffix(".html").name for n in NOTEBOOKS]

# Per image: loaded (naturalWidth) and laid out (a box on the page), so that a figure can be seen.
IMAGES_JS = """() => Array.from(document.images).map(img => ({
    natural: img.naturalWidth, shown: img.getBoundingClientRect().width}))"""
LINKS_JS = "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test's output clean
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """``directory`` served on 127.0.0.1 at a free port; yields its base URL.

    The server is a thread of the test's own process, not a process of its own: nothing of it can
    outlive the test run. On leaving the block, also when the block raised, the thread is stopped and
    the port closed (tests/test_processes.py checks both).
    """
    handler = functools.partial(QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def server(site):
    """The site served on 127.0.0.1 at a free port (:func:`serve`); yields its base URL."""
    with serve(site) as url:
        yield url


def block_the_network(page, base: str) -> list[str]:
    """Abort every request that is not to ``base`` (or a data: URL); return the list they are noted in."""
    blocked = []

    def route(r):
        url = r.request.url
        if url.startswith((base, "data:", "file:")):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    page.route("**/*", route)
    return blocked


def check_images(page, where: str) -> int:
    """Every <img> of the open page loaded (naturalWidth > 0) and is laid out; returns how many."""
    images = page.evaluate(IMAGES_JS)
    for i, img in enumerate(images):
        assert img["natural"] > 0, f"{where}: image {i} did not load"
        assert img["shown"] > 0, f"{where}: image {i} is not visible"
    return len(images)


def test_every_link_and_image_of_the_served_site(page, server):
    blocked = block_the_network(page, server)
    to_visit, seen, external, images = [server + "index.html"], set(), set(), 0
    while to_visit:
        url = to_visit.pop(0)
        if url in seen:
            continue
        seen.add(url)
        response = page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, f"{url} answered {response and response.status}"
        images += check_images(page, url)
        for href in page.evaluate(LINKS_JS):
            target, anchor = urldefrag(href)
            if not target.startswith(server):
                assert urlparse(href).scheme in ("http", "https"), f"{url}: a link out of the site: {href}"
                external.add(href)
                continue
            status = page.request.get(target).status
            assert status == 200, f"{url}: {href} answered {status}"
            if anchor and target == url:
                assert page.evaluate("id => document.getElementById(id) !== null", anchor), f"{url}: no #{anchor}"
            if target.endswith(".html"):
                to_visit.append(target)
    assert seen == {server + name for name in ["index.html"] + ORDER}
    assert images >= len(NOTEBOOKS), "the notebooks' figures"
    assert not blocked, f"the pages asked for something outside the site: {blocked}"
    print(f"\n{len(seen)} pages, {images} images; {len(external)} external links listed, not fetched:")
    print("\n".join(sorted(external)))


def test_previous_and_next_by_clicking(page, server):
    blocked = block_the_network(page, server)
    page.goto(server + "index.html")
    page.click(f"table.course-map a[href='{ORDER[0]}']")
    assert page.url == server + ORDER[0]
    for name in ORDER[1:]:  # forwards with the top bar's next link
        page.click("nav.site-nav-top a.next")
        assert page.url == server + name
    assert page.locator("nav.site-nav a.next").count() == 0, "the last page has no next link"
    for name in reversed(ORDER[:-1]):  # backwards with the bottom bar's previous link
        page.click("nav.site-nav-bottom a.prev")
        assert page.url == server + name
    assert page.locator("nav.site-nav a.prev").count() == 0, "the first page has no previous link"
    page.click("nav.site-nav-top a.index")
    assert page.url == server + "index.html"
    assert not blocked


def test_screenshots_of_the_index_and_a_notebook_page(page, server):
    shots = SHOTS / "site"
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(server + "index.html")
    page.screenshot(path=str(shots / "index.png"), full_page=True)
    page.goto(server + ORDER[0])
    page.screenshot(path=str(shots / "notebook-page.png"))
    figure = page.locator("img").first
    figure.scroll_into_view_if_needed()
    figure.screenshot(path=str(shots / "notebook-figure.png"))
    assert (shots / "index.png").stat().st_size > 10_000


def test_the_site_works_from_the_file_system(page, site):
    """Opened as file:// (no server): the index's links and the pages' images still work."""
    page.goto((site / "index.html").as_uri())
    page.click(f"table.course-map a[href='{ORDER[1]}']")
    assert page.url == (site / ORDER[1]).as_uri()
    assert check_images(page, ORDER[1]) > 0
    page.click("nav.site-nav-top a.prev")
    assert page.url == (site / ORDER[0]).as_uri()
    page.click("nav.site-nav-bottom a.index")
    assert page.url == (site / "index.html").as_uri()
