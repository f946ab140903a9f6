"""The endpoints page against the engine simulator: when interactive load rises, the harvest ceiling drawn for the
shared backend drops."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import client_for
from tests.acceptance.helpers import chat_line, start_batch
from tests.acceptance.test_harvest import MODEL, PROFILE
from tests.browser.conftest import StartServer, screenshot
from tests.browser.test_dashboard import admin_key
from tests.support.processes import sim_serving

CEILING = "section[data-backend='shared'] .ceiling"


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    with sim_serving(PROFILE, tmp_path) as url:
        yield url


def test_the_harvest_ceiling_drops_on_the_chart_when_interactive_load_rises(
    start_server: StartServer, simulator: str, open_tab: Any
) -> None:
    shared = {"name": "shared", "url": simulator, "models": [MODEL], "flavour": "vllm", "max_concurrency": 8}
    server = start_server(
        backends=[shared | {"harvest": True, "priority": "on"}],
        engine_metrics_interval_s=0.2,
        outlook_interval_s=0.3,
        poll_interval_s=0.2,
    )
    key = admin_key(server)
    client = client_for(server, key)
    start_batch(client, [chat_line(f"line-{n}", f"batch line {n}", model=MODEL) for n in range(400)])
    tab = open_tab(server.base_url)
    tab.sign_in(key)
    tab.page.click("nav a[href='/ui/endpoints']")
    shown = f"Number(document.querySelector({CEILING!r})?.textContent)"
    tab.page.wait_for_function(f"() => {shown} >= 4")  # harvesting: the ceiling grows while the engine is idle
    before = float(tab.page.locator(CEILING).inner_text())

    stop = threading.Event()

    def interactive() -> None:
        with client_for(server, key) as session:
            while not stop.is_set():
                session.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=20
                )

    users = [threading.Thread(target=interactive) for _ in range(10)]
    for user in users:
        user.start()
    try:
        tab.page.wait_for_function(f"() => {shown} < {before}", timeout=30_000)
        # The engine's own queue, as the controller reads it from the simulator's /metrics, is drawn beside it.
        tab.page.wait_for_selector("section[data-backend='shared'] polyline[data-series='engine queue']")
        screenshot(tab, "ui-endpoints")
    finally:
        stop.set()
        for user in users:
            user.join(30)
