"""Browser fixtures: Debian's chromium driven by Playwright, against real `backfill serve` processes.

Without chromium (or Playwright) these tests skip with a reason, unless BACKFILL_REQUIRE_BROWSER=1 (set by .ci/run),
where they fail instead. The browser may reach 127.0.0.1 only: any other request is aborted and recorded, and
each test asserts that none was made."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import StartServer, _close_clients, start_server, upstream  # noqa: F401 - fixtures
from tests.support.databases import PG_URL, database_url_for

CHROMIUM = os.environ.get("BACKFILL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE_BROWSER = os.environ.get("BACKFILL_REQUIRE_BROWSER") == "1"
DOCS = Path(__file__).resolve().parents[2] / "docs"
try:
    import playwright  # noqa: F401 - only whether it is there

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False
# The test modules import Playwright: without it they are not collected, unless CI requires them (then the import
# error fails the run).
collect_ignore_glob = [] if HAVE_PLAYWRIGHT or REQUIRE_BROWSER else ["test_*.py"]
LOOPBACK = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "about:", "blob:http://127.0.0.1:")


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"BACKFILL_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


# Per module, not per session: Playwright's sync API runs an event loop in this thread while it is open, and
# pytest-asyncio cannot run the suite's async tests that come after until it is closed.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Tab:
    """A page in its own browser context (its own cookies), and the non-loopback URLs it tried to reach."""

    page: Any
    base_url: str
    escaped: list[str] = field(default_factory=list)

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.base_url}/ui/login")
        self.page.fill("#key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("#nav:not([hidden])")


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []
    tabs: list[Tab] = []

    def open_(base_url: str) -> Tab:
        context = browser.new_context(viewport={"width": 1366, "height": 800})
        contexts.append(context)
        tab = Tab(context.new_page(), base_url)

        def guard(route: Any) -> None:
            url = route.request.url
            if url.startswith(LOOPBACK):
                route.continue_()
            else:
                tab.escaped.append(url)
                route.abort()

        context.route("**/*", guard)
        context.set_default_timeout(20_000)
        tabs.append(tab)
        return tab

    yield open_
    for context in contexts:
        context.close()
    assert [] == [url for tab in tabs for url in tab.escaped]


def screenshot(tab: Tab, name: str) -> None:
    """docs/<name>.png, the picture docs/dashboard.md shows."""
    tab.page.screenshot(path=str(DOCS / f"{name}.png"), full_page=False)


__all__ = ["StartServer", "Tab", "screenshot"]


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """One database, not both: PostgreSQL where the suite has one (CI), else a SQLite file; the browser tests
    check the pages, and tests/integration checks the queries on both."""
    with database_url_for("postgres" if PG_URL else "sqlite", tmp_path) as url:
        yield url
