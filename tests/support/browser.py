"""A real browser for the console's tests: Playwright (sync API) driving Debian's Chromium.

test_console.py imports the fixtures from here:

- ``browser`` (session): headless Chromium from ``CHROMIUM`` (/usr/bin/chromium, or
  JOBS_CHROMIUM). Without it, or without the playwright package, the browser tests
  skip, and fail under CI=true: `make test` installs both (Debian's chromium as
  root, playwright from requirements-dev.txt). Playwright's own browser download
  is never used.
- ``page``: a fresh context (1280x800, its own sessionStorage) and page per test,
  watched: every console error and uncaught page error is collected, and the test
  fails at teardown if any was not expected (``page.watch.allow(pattern)``).
- ``screenshot(page, name, full_page=False)``: with JOBS_SCREENSHOTS=<dir> set (`make
  screenshots` sets docs/screenshots), the viewport (or the whole page) as
  <dir>/<name>.png; otherwise nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("JOBS_CHROMIUM") or "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 10_000


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_browser() -> None:
    """Skip (fail under CI=true) when Chromium or Playwright is missing."""
    problem = None
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problem = (
            f"Chromium is not installed at {CHROMIUM}: `make test` installs Debian's "
            "package as root (apt-get install chromium); the browser tests did not run"
        )
    elif not _playwright_importable():
        problem = "the playwright package is missing (pip install -r requirements-dev.txt)"
    if problem is None:
        return
    if _in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


def _playwright_importable() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


class ConsoleWatch:
    """Console errors and uncaught exceptions of one page; some may be expected."""

    def __init__(self, page):
        self.problems: list[str] = []
        self.allowed: list[re.Pattern] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))

    def _on_console(self, message) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        self.problems.append(f"{message.text} [{url}]")

    def allow(self, pattern: str) -> None:
        """Console errors matching ``pattern`` (text and URL) are expected from here on."""
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a.search(p) for a in self.allowed)]

    def check(self) -> None:
        assert not self.unexpected(), f"console errors: {self.unexpected()}"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.watch = ConsoleWatch(page)
    try:
        yield page
        page.watch.check()
    finally:
        context.close()


def expect(target):
    """Playwright's ``expect`` (imported late: the module loads without playwright)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def screenshot(page, name: str, full_page: bool = False) -> Path | None:
    folder = os.environ.get("JOBS_SCREENSHOTS")
    if not folder:
        return None
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path
