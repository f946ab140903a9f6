"""The dashboard in a real browser: sign in, watch a batch run, cancel it, and what a tenant may not see."""

from __future__ import annotations

import asyncio
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from playwright.sync_api import expect

from backfill.domain.batches import Batch, BatchStatus
from backfill.store.engine import create_engine
from backfill.store.sql import SqlStore
from tests.acceptance.conftest import client_for
from tests.acceptance.helpers import chat_line, start_batch, wait_for
from tests.acceptance.message_batch_client import AnthropicClients, message
from tests.browser.conftest import StartServer, screenshot
from tests.support.processes import Server, Upstream, child_env


def admin_key(server: Server) -> str:
    out = subprocess.run(
        server.command("keys", "create", "--tenant", "ops", "--admin"), env=child_env(), check=True, capture_output=True
    )
    return out.stdout.decode().strip().splitlines()[-1]


def test_a_batch_appears_advances_and_is_cancelled_from_the_page(
    start_server: StartServer, upstream: Upstream, open_tab: Any
) -> None:
    server = start_server()
    key = server.create_key("research")
    tab = open_tab(server.base_url)
    tag = f"ui-{time.monotonic_ns()}"
    lines = [chat_line(f"quick-{i}", f"hello {i}") for i in range(4)]
    lines += [chat_line(f"held-{i}", f"held {i} {tag} #gate:{tag}") for i in range(4)]
    batch = start_batch(client_for(server, key), lines, metadata={"team": "eval"})

    tab.sign_in(key)
    row = tab.page.locator(f"tr[data-id='{batch.id}']")
    expect(row).to_be_visible()
    expect(row.locator(".progress")).to_have_text("4 / 8")  # the quick lines ended; the held ones wait
    screenshot(tab, "ui-batches")

    row.locator("a").click()
    expect(tab.page.locator("#status")).to_have_text("in_progress")
    expect(tab.page.locator("#done")).to_have_text("4")
    screenshot(tab, "ui-batch")
    tab.page.click("#cancel")
    upstream.open_gate(tag)  # the held lines come back as the cancel's grace ends
    expect(tab.page.locator("#status")).to_have_text("cancelled")

    assert "cancelled" == wait_for(client_for(server, key), batch.id, lambda b: b.status == "cancelled", 30).status


def test_a_tenant_sees_neither_another_tenants_batch_nor_its_page(start_server: StartServer, open_tab: Any) -> None:
    server = start_server()
    theirs = start_batch(client_for(server, server.create_key("a")), [chat_line("x", "hi")])
    b_key = server.create_key("b")
    mine = start_batch(client_for(server, b_key), [chat_line("y", "hi")], metadata={"team": "eval"})
    with AnthropicClients() as anthropic_clients:
        messages = anthropic_clients(server, b_key).messages.batches.create(requests=[message("z", "hi")])
    tab = open_tab(server.base_url)

    tab.sign_in(b_key)
    expect(tab.page.locator(f"tr[data-id='{mine.id}']")).to_be_visible()
    expect(tab.page.locator(f"tr[data-id='{messages.id}']")).to_contain_text("anthropic")  # every API, one list
    assert 0 == tab.page.locator(f"tr[data-id='{theirs.id}']").count()
    tab.page.fill("input[name=metadata]", "team=eval")
    tab.page.click("#filters button")
    expect(tab.page.locator("#count")).to_have_text("1 batches")  # the message batch has no such metadata
    expect(tab.page.locator(f"tr[data-id='{mine.id}']")).to_be_visible()
    tab.page.goto(f"{server.base_url}/ui/batches/{theirs.id}")
    expect(tab.page.locator("#not-found")).to_contain_text("No such batch")
    refused = tab.page.request.get(f"{server.base_url}/ui/api/batches/{theirs.id}/files/input")
    assert 404 == refused.status


def test_an_action_without_the_csrf_token_is_refused(start_server: StartServer, open_tab: Any) -> None:
    server = start_server()
    key = server.create_key("a")
    batch = start_batch(client_for(server, key), [chat_line("x", "hi")])
    tab = open_tab(server.base_url)
    tab.sign_in(key)

    refused = tab.page.request.post(f"{server.base_url}/ui/api/batches/{batch.id}/cancel", data="{}")
    signed_out = tab.page.context.browser.new_context().request.get(f"{server.base_url}/ui/api/batches")

    assert (403, 401) == (refused.status, signed_out.status)


def _insert_batches(database_url: str, count: int) -> None:
    async def insert() -> None:
        store = SqlStore(create_engine(database_url))
        tenant = await store.ensure_tenant("bulk", int(time.time()))
        now = int(time.time())
        for i in range(count):
            await store.create_batch(
                Batch(
                    id=f"batch_bulk{i:06d}{'x' * 20}",
                    tenant_id=tenant,
                    endpoint="/v1/chat/completions",
                    input_file_id=f"file-bulk{i}",
                    completion_window="24h",
                    status=BatchStatus.COMPLETED,
                    created_at=now,
                    expires_at=now + 86400,
                    model="test-model",
                    total=10,
                    completed=9,
                    failed=1,
                )
            )
        await store.close()

    # Playwright's sync API runs an event loop in this thread: the store's in another.
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, insert()).result()


def test_a_list_of_a_thousand_batches_renders_in_under_a_second(
    start_server: StartServer, open_tab: Any, database_url: str
) -> None:
    server = start_server()
    key = admin_key(server)
    _insert_batches(database_url, 1000)
    tab = open_tab(server.base_url)

    tab.sign_in(key)
    expect(tab.page.locator("#count")).to_have_text("1000 batches")
    render_ms = float(tab.page.evaluate("document.body.dataset.renderMs"))

    assert render_ms < 1000, render_ms


def test_endpoints_and_usage_pages_show_the_backend_and_the_tokens(start_server: StartServer, open_tab: Any) -> None:
    server = start_server()
    key = admin_key(server)
    client = client_for(server, key)
    batch = start_batch(client, [chat_line(f"l{i}", f"hi {i}") for i in range(3)])
    wait_for(client, batch.id, lambda b: b.status == "completed", 30)
    tab = open_tab(server.base_url)
    tab.sign_in(key)

    tab.page.click("nav a[href='/ui/endpoints']")
    expect(
        tab.page.locator("section[data-backend='upstream'] polyline[data-series='batch lines in flight']")
    ).to_be_attached()
    tab.page.click("nav a[href='/ui/usage']")
    expect(tab.page.locator("#tokens tbody tr").first).to_contain_text("batch")
    screenshot(tab, "ui-usage")
