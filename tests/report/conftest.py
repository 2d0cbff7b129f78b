"""A real headless browser for the HTML report tests: Debian's chromium driven by Playwright.

The browser is installed by the project's own test setup: when it is missing,
``scripts/install-test-browser.sh`` installs it (apt-get, as root). If that cannot
be done the browser tests fail with the installer's message; they are never
skipped, so a broken report cannot pass unseen.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BROWSER = Path(os.environ.get("GRADWISE_TEST_BROWSER", "/usr/bin/chromium"))
INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install-test-browser.sh"
# No network, no GPU, nothing phoning home: the page must render from the file alone.
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageCheck:
    """What a browser saw when it loaded a page."""

    title: str
    heading_visible: bool
    text_length: int
    image_count: int
    broken_images: list[str]
    console_errors: list[str]
    page_errors: list[str]
    screenshot: Path
    colours: int
    failed_requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Everything wrong with the page; empty when it loaded cleanly and shows something."""
        found = [f"console error: {m}" for m in self.console_errors]
        found += [f"page error: {m}" for m in self.page_errors]
        found += [f"broken image: {m}" for m in self.broken_images]
        found += [f"request failed: {m}" for m in self.failed_requests]
        if not self.title.strip() or not self.heading_visible:
            found.append("no visible title")
        if self.text_length < 200:
            found.append(f"blank page ({self.text_length} characters of text)")
        if self.colours <= 1:
            found.append("screenshot is a single colour")
        return found


def ensure_browser(browser: Path, installer: Path) -> Path:
    """``browser``, installed by ``installer`` first when missing; pytest.fail (never skip) if that fails."""
    if os.access(browser, os.X_OK):
        return browser
    # pytest-xdist workers may all get here at once: one installs, the others wait for it (apt has one lock).
    with open(Path(tempfile.gettempdir()) / "gradwise-test-browser.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            ["bash", str(installer)],
            env={**os.environ, "GRADWISE_TEST_BROWSER": str(browser)},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0 or not os.access(browser, os.X_OK):
        message = (result.stderr or result.stdout).strip().splitlines()
        pytest.fail(f"the report tests need {browser}; {installer.name} failed: {message[-1] if message else '?'}")
    return browser


@pytest.fixture(name="ensure_browser")
def ensure_browser_fixture() -> Callable[[Path, Path], Path]:
    """:func:`ensure_browser` itself, for the test of its failure path."""
    return ensure_browser


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The Chromium executable the browser tests drive (installed on first use when missing)."""
    return ensure_browser(BROWSER, INSTALLER)


@pytest.fixture(scope="session")
def browser(chromium: Path) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # a missing driver is a broken test setup, not a reason to skip
        pytest.fail(f"the report tests need the playwright package: {exc}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=BROWSER_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def inspect_page(browser: Any) -> Callable[[Path, Path], PageCheck]:
    """Load a local HTML file in the browser and report what it saw (see :class:`PageCheck`)."""

    def inspect(page_file: Path, screenshot: Path) -> PageCheck:
        from PIL import Image

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console_errors: list[str] = []
        page_errors: list[str] = []
        failed: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.on("requestfailed", lambda r: failed.append(f"{r.url[:60]} ({r.failure})"))
        try:
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "() => Array.from(document.images, (img, i) => ({i, alt: img.alt,"
                " ok: img.complete && img.naturalWidth > 0 && img.naturalHeight > 0}))"
            )
            heading = page.locator("h1").first
            heading_visible = heading.count() > 0 and heading.is_visible()
            text_length = len(page.evaluate("() => document.body ? document.body.innerText.trim() : ''"))
            title = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            page.close()
        with Image.open(screenshot) as shot:
            extrema = shot.convert("RGB").getextrema()
        colours = 1 if all(low == high for low, high in extrema) else 2  # 2 = "more than one"
        return PageCheck(
            title=title,
            heading_visible=heading_visible,
            text_length=text_length,
            image_count=len(images),
            broken_images=[f"#{img['i']} {img['alt']}" for img in images if not img["ok"]],
            console_errors=console_errors,
            page_errors=page_errors,
            screenshot=screenshot,
            colours=colours,
            failed_requests=failed,
        )

    return inspect
