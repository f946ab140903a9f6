"""HTTP client cost: CPU per request through httpx, httpx2 and aiohttp, at several concurrencies.

The profile of `backfill serve` under bench/throughput.py showed two thirds of its event loop inside the HTTP
client (httpx: httpcore's pool bookkeeping, anyio, h11), which is why batch lines and the interactive proxy now
go through aiohttp. This isolates that cost: closed-loop workers in this process (on uvloop, as the server runs)
POST small chat requests to the instant fake upstream through `httpx` (httpcore 1.x: what backfill used before,
and the cookbook client), `httpx2` (httpcore2, pulled in by the openai SDK) and `aiohttp`, the order rotated each
round. Printed: requests/s and client CPU microseconds per request (this process's CPU time over the round; the
upstream runs in its own process), and each client's CPU over aiohttp's.

    .venv/bin/python bench/http_pool.py                    # 20,000 requests per cell, concurrency 1, 8, 64
    .venv/bin/python bench/http_pool.py --quick            # 3,000 requests per cell
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson
import uvloop
from harness import MODEL, Upstream, machine_line, median, running, table

LIBRARIES = ("httpx", "httpx2", "aiohttp")
HEADERS = {"content-type": "application/json"}


class _Httpx:
    """httpx or httpx2 (the same API): one client, a pool of `concurrency` connections."""

    def __init__(self, library: Any, concurrency: int) -> None:
        limits = library.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = library.AsyncClient(limits=limits, timeout=60)

    async def post(self, url: str, body: bytes) -> tuple[int, bytes]:
        response = await self.client.post(url, content=body, headers=HEADERS)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


class _Aiohttp:
    """aiohttp as backfill's backend sends batch lines: one session, a connector of `concurrency` connections."""

    def __init__(self, library: Any, concurrency: int) -> None:
        self.session = library.ClientSession(connector=library.TCPConnector(limit=concurrency, limit_per_host=0))

    async def post(self, url: str, body: bytes) -> tuple[int, bytes]:
        async with self.session.post(url, data=body, headers=HEADERS) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self.session.close()


async def _round(name: str, library: Any, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Wall and CPU seconds for `requests` POSTs with `concurrency` workers."""
    client = (_Aiohttp if name == "aiohttp" else _Httpx)(library, concurrency)
    remaining = 2 * concurrency  # a warm-up that opens every connection of the pool

    async def worker(worker_id: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"worker {worker_id} line {remaining}"}]}
            status, content = await client.post(url, orjson.dumps(body))
            if status != 200:
                raise RuntimeError(f"upstream answered {status}")
            orjson.loads(content)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))  # connect the pool
        remaining = requests
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement (default 20,000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=3, help="rounds, rotating which library goes first")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 3,000 requests, one round")
    args = parser.parse_args(argv)
    requests, repeat = (3_000, 1) if args.quick else (args.requests, args.repeat)
    print(machine_line())
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.import_module(name)
        except ImportError:
            print(f"{name} is not installed: skipped")
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with running() as children:
        upstream = Upstream.start(children)
        url = f"{upstream.url}/v1/chat/completions"
        for run in range(repeat):
            names = list(libraries)
            order = names[run % len(names) :] + names[: run % len(names)]
            for concurrency in args.concurrency:
                for name in order:
                    upstream.reset()
                    wall, cpu = uvloop.run(_round(name, libraries[name], url, requests, concurrency))
                    results.setdefault((name, concurrency), []).append((wall, cpu))
                    rate, cpu_us = requests / wall, 1e6 * cpu / requests
                    print(f"round {run + 1}: {name} x{concurrency}: {rate:.0f} req/s, {cpu_us:.0f} us CPU/req")
    rows = []
    for concurrency in args.concurrency:
        cpu_us = {}
        for name in libraries:
            runs = results[(name, concurrency)]
            wall, cpu = median([w for w, _ in runs]), median([c for _, c in runs])
            cpu_us[name] = 1e6 * cpu / requests
            rows.append([name, str(concurrency), f"{requests / wall:.0f}", f"{cpu_us[name]:.0f}"])
        if "aiohttp" in cpu_us:
            for name in (name for name in cpu_us if name != "aiohttp"):
                ratio = cpu_us[name] / cpu_us["aiohttp"]
                rows.append([f"  {name} / aiohttp CPU", str(concurrency), "", f"{ratio:.2f}x"])
    print(f"\n{requests} requests per cell, medians of {repeat} round(s)\n")
    print(table(["client", "concurrency", "req/s", "client CPU us/req"], rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
