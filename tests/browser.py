"""A headless Chromium for the browser tests, driven by Playwright (no browser download).

Playwright comes from PyPI (the ``test`` extra); the browser is the system's Chromium (Debian's
``chromium`` package: ``/usr/bin/chromium``), or the executable named by ``WORKBOOK_CHROMIUM``.
``./workbook.sh test`` installs Debian's package only where ``CI=true`` or ``WORKBOOK_BROWSER=1``.
Where no browser can be had the browser tests skip and say how to get one; with ``CI=true`` they
fail instead, so CI never passes without running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "build" / "browser"  # screenshots land here (git-ignored build folder)
VIEWPORT = {"width": 1280, "height": 900}  # a laptop-sized JupyterLab window, one CSS pixel per pixel
# Flags for a closed network: without the background-networking ones Chromium keeps calling home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOW_TO_GET_ONE = ("install Debian's chromium (apt-get install chromium) or run "
                  "`WORKBOOK_BROWSER=1 ./workbook.sh test`, which installs it")


def chromium_path() -> str | None:
    """The Chromium executable to drive: ``WORKBOOK_CHROMIUM``, else the first of the usual names on PATH."""
    named = os.environ.get("WORKBOOK_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def no_browser(why: str):
    """Skip (fail under ``CI=true``) with a message that says how to get a browser."""
    message = f"browser tests need a browser: {why}; {HOW_TO_GET_ONE}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing browser is a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    """A Playwright ``Browser`` on the system's headless Chromium (session-wide)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("Playwright is not installed (pip install playwright; no `playwright install` needed)")
    exe = chromium_path()
    if exe is None:
        no_browser("no chromium executable found")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page, 1280 x 900 CSS pixels at one device pixel each; closed after the test."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    p = context.new_page()
    yield p
    context.close()
