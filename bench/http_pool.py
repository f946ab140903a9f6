"""HTTP client cost: CPU per request through httpx's connection pool, against httpx2's, at several concurrencies.

The profile of `backfill serve` under bench/throughput.py shows most of its CPU inside httpcore's
`AsyncConnectionPool._assign_requests_to_connections`, which scans every pooled connection (and, for each idle one,
every connection again) on each request and each response. This isolates that cost: closed-loop workers in this
process POST small chat requests to the instant fake upstream, first through `httpx` (httpcore 1.x, what backfill
and the cookbook client use), then through `httpx2` (httpcore2, pulled in by the openai SDK), alternating the
order per round. Printed: requests/s and client CPU microseconds per request (this process's CPU time over the
round; the upstream runs in its own process).

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
from harness import MODEL, Upstream, machine_line, median, running, table

LIBRARIES = ("httpx", "httpx2")


async def _round(library: Any, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Wall and CPU seconds for `requests` POSTs with `concurrency` workers."""
    limits = library.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    remaining = 2 * concurrency  # a warm-up that opens every connection of the pool

    async def worker(client: Any, worker_id: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"worker {worker_id} line {remaining}"}]}
            response = await client.post(url, content=orjson.dumps(body), headers={"content-type": "application/json"})
            if response.status_code != 200:
                raise RuntimeError(f"upstream answered {response.status_code}")
            orjson.loads(response.content)

    async with library.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client, i) for i in range(concurrency)))  # connect the pool
        remaining = requests
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client, i) for i in range(concurrency)))
        return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement (default 20,000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=2, help="rounds, alternating which library goes first")
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
            order = list(libraries) if run % 2 == 0 else list(reversed(libraries))
            for concurrency in args.concurrency:
                for name in order:
                    upstream.reset()
                    wall, cpu = asyncio.run(_round(libraries[name], url, requests, concurrency))
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
        if len(cpu_us) == 2:
            rows.append(["  httpx / httpx2 CPU", str(concurrency), "", f"{cpu_us['httpx'] / cpu_us['httpx2']:.2f}x"])
    print(f"\n{requests} requests per cell, medians of {repeat} round(s)\n")
    print(table(["client", "concurrency", "req/s", "client CPU us/req"], rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
