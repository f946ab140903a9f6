"""Dashboard (issue 22): how long the batch list takes with 1,000 batches, beside the same page with 10.

A real `backfill serve` (SQLite, open mode) and Debian's chromium driven headless by Playwright. Batches are
written straight into the server's database (ended batches of one tenant, of four statuses, as
`SqlStore.create_batch` writes them), first 10, then up to 1,000; for each count, `--repeat` times (median printed):

    api          GET /ui/api/batches with the session cookie (httpx, the server's answer, JSON of every batch)
    page load    a fresh tab: goto /ui until the list says "N batches" (fetch + render + the page's own scripts)
    render       the page's own measure of turning the JSON into rows (`performance.now()` around innerHTML)

The figure: each column at 1,000 batches over the same at 10 (the baseline), and the page load at 1,000 against the
issue's one second.

    .venv/bin/python bench/dashboard.py
    .venv/bin/python bench/dashboard.py --repeat 3 --batches 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import Server, machine_line, running, table

from backfill.domain.batches import Batch, BatchStatus
from backfill.store.engine import create_engine
from backfill.store.sql import SqlStore

# Ended batches: the list reads the same columns for every status, and an in-progress batch without lines would set
# the server's dispatcher looking for them.
ENDED = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED)
CHROMIUM = os.environ.get("BACKFILL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


async def add_batches(database_url: str, start: int, stop: int) -> None:
    store = SqlStore(create_engine(database_url))
    now = int(time.time())
    tenant = await store.ensure_tenant("bench", now)
    for i in range(start, stop):
        await store.create_batch(
            Batch(
                id=f"batch_bench{i:06d}{'x' * 20}",
                tenant_id=tenant,
                endpoint="/v1/chat/completions",
                input_file_id=f"file-bench{i}",
                completion_window="24h",
                status=ENDED[i % len(ENDED)],
                created_at=now - i,
                expires_at=now + 86400,
                model="bench-model",
                total=1000,
                completed=900,
                failed=100,
            )
        )
    await store.close()


def measure(base_url: str, browser: object, count: int, repeat: int) -> tuple[float, float, float]:
    """Median (api ms, page load ms, render ms) of the list with `count` batches."""
    api, load, render = [], [], []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        http.post("/ui/api/login", json={"key": ""}).raise_for_status()
        for _ in range(repeat):
            started = time.perf_counter()
            answer = http.get("/ui/api/batches")
            api.append((time.perf_counter() - started) * 1000)
            assert count == len(answer.json()["data"]), answer.text[:200]
        cookies = [{"name": c.name, "value": c.value or "", "url": base_url + "/ui"} for c in http.cookies.jar]
    for _ in range(repeat):
        context = browser.new_context(viewport={"width": 1366, "height": 800})  # type: ignore[attr-defined]
        context.add_cookies(cookies)
        page = context.new_page()
        started = time.perf_counter()
        page.goto(f"{base_url}/ui")
        page.wait_for_function(f"() => document.getElementById('count')?.textContent === '{count} batches'")
        load.append((time.perf_counter() - started) * 1000)
        render.append(float(page.evaluate("document.body.dataset.renderMs")))
        context.close()
    return statistics.median(api), statistics.median(load), statistics.median(render)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("needs Playwright (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"needs chromium at {CHROMIUM} (apt-get install chromium)", file=sys.stderr)
        return 2
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp, running() as children, sync_playwright() as playwright:
        server = Server.start(children, Path(tmp), {"url": "http://127.0.0.1:9/v1"})
        base_url = f"http://127.0.0.1:{server.port}"
        database_url = f"sqlite:///{Path(tmp) / 'data' / 'backfill.db'}"
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        results = {}
        have = 0
        for count in (args.baseline, args.batches):
            # Playwright's sync API runs an event loop in this thread: the store's runs in another.
            with ThreadPoolExecutor(1) as thread:
                thread.submit(asyncio.run, add_batches(database_url, have, count)).result()
            have = count
            results[count] = measure(base_url, browser, count, args.repeat)
            rows.append([f"{count:,}", *(f"{ms:.1f}" for ms in results[count])])
        browser.close()
        server.stop(children)
    ratios = [big / small for big, small in zip(results[args.batches], results[args.baseline], strict=True)]
    rows.append([f"{args.batches:,} / {args.baseline:,}", *(f"{r:.1f}x" for r in ratios)])
    print(table(["batches", "api ms", "page load ms", "render ms"], rows))
    load_ms = results[args.batches][1]
    verdict = "met" if load_ms < 1000 else "NOT met"
    print(f"{args.batches:,} batches: page load {load_ms:.0f} ms, {load_ms / 1000:.2f} of the 1 s goal ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
