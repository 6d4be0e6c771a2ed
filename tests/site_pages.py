"""The rendered course site the site tests share (rendered once a session), and a reader of its pages."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """A folder with the site ``tools/site.py`` renders from the committed notebooks (not executed)."""
    from tools.site import render_site

    out = tmp_path_factory.mktemp("site")
    render_site(NOTEBOOKS, out)
    return out


class Page(HTMLParser):
    """What the tests read from a page: its links, images, ids and navigation bars."""

    def __init__(self, path: Path):
        super().__init__()
        self.hrefs: list[str] = []  # every <a href>
        self.sources: list[tuple[str, str]] = []  # (tag, src or href) of everything the page loads
        self.images: list[str] = []  # every <img src>
        self.ids: set[str] = set()  # every id and name an anchor can point at
        self.navs: list[dict[str, str]] = []  # per navigation bar: {"prev": href, "index": ..., "next": ...}
        self._in_nav = False
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag == "nav" and "site-nav" in (attrs.get("class") or ""):
            self._in_nav = True
            self.navs.append({})
        if tag == "a" and attrs.get("href") is not None:
            self.hrefs.append(attrs["href"])
            if self._in_nav:
                role = (attrs.get("class") or "").split()[0]
                self.navs[-1][role] = attrs["href"]
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag in ("img", "script", "iframe", "source") and attrs.get("src"):
            self.sources.append((tag, attrs["src"]))
        if tag == "link" and attrs.get("href"):
            self.sources.append((tag, attrs["href"]))

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False
