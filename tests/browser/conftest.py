"""A real headless Chromium (Debian's package, installed by `make setup`) driven by Playwright.

Never a browser downloaded at run time: Playwright is pointed at the system's Chromium, and the tests
fail (not skip) when it is missing, so a machine set up without it cannot pass quietly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("QUEUEFORMER_TEST_CHROMIUM", "/usr/bin/chromium"))
# Headless, no sandbox (tests run as root in containers), and nothing that reaches the network on its own.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package for the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data dir), removed on close.
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh context per test: its own sessionStorage, so no key leaks from one test to the next."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()
