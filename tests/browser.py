"""Headless Chromium for the tests that open featopt's pages in a real browser, driven by playwright
with `executable_path` (it never downloads a browser). Where the browser or playwright is missing
the test is skipped, except under FEATOPT_REQUIRE_BROWSER=1 (CI sets it), where it fails."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest


def chromium() -> str | None:
    return os.environ.get("FEATOPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def unavailable(reason: str):
    """Skip, except where FEATOPT_REQUIRE_BROWSER=1 (CI sets it): there a missing browser fails the
    test, so that CI cannot pass with the browser test silently skipped."""
    if os.environ.get("FEATOPT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (FEATOPT_REQUIRE_BROWSER=1 requires the browser test to run)", pytrace=False)
    pytest.skip(reason)


def playwright():
    """`(playwright.sync_api, the Chromium executable)`, or skip (fail under FEATOPT_REQUIRE_BROWSER=1)."""
    executable = chromium()
    if not executable:
        unavailable("no Chromium found: install it (apt-get install chromium) or set FEATOPT_CHROMIUM to its executable")
    try:
        from playwright import sync_api  # driven with executable_path: it never downloads a browser
    except ImportError:
        unavailable('playwright is not installed: pip install -c constraints.txt -e ".[dev]" (or pip install playwright)')
    return sync_api, executable


@contextlib.contextmanager
def browser_page():
    """`(page, console messages, page errors)` of a fresh headless Chromium (1200 x 900), closed
    after the block; skips as :func:`playwright` does."""
    sync_api, executable = playwright()
    messages, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, messages, errors
        finally:
            browser.close()
