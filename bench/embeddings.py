"""Embeddings: lines per second of an embeddings batch through `backfill serve`, beside the same inputs sent straight
to the upstream in requests of 256 inputs.

Both sides embed the same N one-input lines (default 20,000, ~100 B of varied text each) on the same instant fake
upstream (`python -m backfill.testing.upstream`), one at a time:

    direct     this process, httpx, the inputs in requests of 256 (`--direct-inputs`), `--concurrency` requests in
               flight: what a hand-written client that batches inputs itself gets. Time: first request to last
               answer.
    backfill   `backfill serve` (SQLite, default settings) whose one backend has max_concurrency `--concurrency` and
               max_inputs_per_request 256; the file is uploaded first (not timed). Time: POST /v1/batches -> status
               `completed` seen by polling every 100 ms: validation, dispatch (lines coalesced into array requests
               and split back), the group commits of every result and finalization (the output file written).

Every line must come back exactly once with status 200 and one vector. Printed: lines/s of each side, the ratio
backfill / direct (the figure), CPU ms per line, the upstream requests each side made.
Goals (issue 17): backfill >= 25 % of the direct rate, and >= 20,000 lines/s.

    .venv/bin/python bench/embeddings.py                      # 20,000 lines
    .venv/bin/python bench/embeddings.py --quick              # 2,000 lines
    .venv/bin/python bench/embeddings.py --profile bench/out/embeddings.svg   # py-spy on the server
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness import MODEL, Children, Server, Upstream, cpu_s, machine_line, profiled, running, table

POLL_S = 0.1
TERMINAL = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/embeddings"
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")


def generate(path: Path, lines: int, text_chars: int = 100, seed: int = 20261203) -> list[str]:
    """Write `lines` one-input embeddings requests (the same seed, the same bytes); returns the texts."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    pool = " ".join(rng.choices(words, k=100_000))
    texts = []
    with path.open("wb") as out:
        for i in range(lines):
            start = rng.randrange(len(pool) - text_chars)
            text = pool[start : start + text_chars]
            texts.append(text)
            line = {
                "custom_id": f"em-{i:07d}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {"model": MODEL, "input": text},
            }
            out.write(orjson.dumps(line) + b"\n")
    return texts


async def _direct(url: str, texts: list[str], per_request: int, concurrency: int) -> tuple[float, int]:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    got = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal got
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await client.post(f"{url}{ENDPOINT}", json={"model": MODEL, "input": chunk})
            response.raise_for_status()
            data = orjson.loads(response.content)["data"]
            if len(data) != len(chunk):
                raise RuntimeError(f"direct: {len(data)} vectors for {len(chunk)} inputs")
            got += len(data)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    if got != len(texts):
        raise RuntimeError(f"direct: {got} vectors for {len(texts)} inputs")
    return seconds, len(chunks)


def run_direct(upstream: Upstream, texts: list[str], per_request: int, concurrency: int) -> dict[str, float]:
    upstream.reset()
    upstream_before = cpu_s(upstream.process.pid)
    cpu_before = time.process_time()
    seconds, requests = asyncio.run(_direct(upstream.url, texts, per_request, concurrency))
    return {
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu_before,
        "upstream_cpu_s": cpu_s(upstream.process.pid) - upstream_before,
        "requests": requests,
    }


def run_backfill(
    children: Children,
    upstream: Upstream,
    path: Path,
    workdir: Path,
    lines: int,
    per_request: int,
    concurrency: int,
    profile: Path | None,
) -> dict[str, Any]:
    backend = {"url": upstream.url, "max_concurrency": concurrency, "max_inputs_per_request": per_request}
    backend["max_tokens_per_request"] = 1_000_000  # the count of inputs is the bound here
    server = Server.start(children, workdir, backend, {"max_lines": max(50_000, lines)})
    try:
        file_id = server.upload(path)["id"]
        upstream.reset()
        with profiled(children, server.pid, profile):
            cpu_before, upstream_before = cpu_s(server.pid), cpu_s(upstream.process.pid)
            started = time.perf_counter()
            batch = server.create_batch(file_id, ENDPOINT)
            seen: dict[str, float] = {batch["status"]: started}
            while batch["status"] not in TERMINAL:
                time.sleep(POLL_S)
                batch = server.batch(batch["id"])
                seen.setdefault(batch["status"], time.perf_counter())
            finished = seen[batch["status"]]
            cpu, upstream_cpu = cpu_s(server.pid) - cpu_before, cpu_s(upstream.process.pid) - upstream_before
        if batch["status"] != "completed" or batch["error_file_id"] is not None:
            raise RuntimeError(f"backfill: batch ended {batch['status']}: {batch}")
        output = [orjson.loads(line) for line in server.content(batch["output_file_id"]).splitlines()]
        ids = {line["custom_id"] for line in output}
        ok = all(len(line["response"]["body"]["data"]) == 1 for line in output)
        if len(output) != lines or len(ids) != lines or not ok:
            raise RuntimeError(f"backfill: {len(output)} results ({len(ids)} distinct) for {lines} lines")
        requests = httpx.get(f"{upstream.url}/_stats?log=0", timeout=30).json()["answered"][ENDPOINT]["requests"]
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        server.stop(children)
    order = sorted(seen.items(), key=lambda item: item[1])
    phases = {s: (order[i + 1][1] if i + 1 < len(order) else finished) - t for i, (s, t) in enumerate(order)}
    return {
        "seconds": finished - started,
        "cpu_s": cpu,
        "upstream_cpu_s": upstream_cpu,
        "requests": requests,
        "phases": phases,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000, help="one-input lines in the batch (default 20,000)")
    parser.add_argument("--direct-inputs", type=int, default=256, help="inputs a request, both sides (default 256)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight, both sides (default 8)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 2,000 lines")
    parser.add_argument("--profile", type=Path, help="py-spy the backfill server into this file (.svg, .json, .txt)")
    args = parser.parse_args(argv)
    lines = 2_000 if args.quick else args.lines
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-embeddings-"))
    try:
        path = tmp / "requests.jsonl"
        texts = generate(path, lines)
        with running() as children:
            upstream = Upstream.start(children)
            direct = run_direct(upstream, texts, args.direct_inputs, args.concurrency)
            print(f"direct: {lines / direct['seconds']:.0f} inputs/s ({direct['seconds']:.2f} s)")
            work = tmp / "backfill"
            backfill = run_backfill(
                children, upstream, path, work, lines, args.direct_inputs, args.concurrency, args.profile
            )
            print(f"backfill: {lines / backfill['seconds']:.0f} lines/s ({backfill['seconds']:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{lines} one-input lines, {args.direct_inputs} inputs a request, {args.concurrency} in flight\n")
    rows = [
        [name, f"{side['seconds']:.2f}", f"{lines / side['seconds']:.0f}", f"{1000 * side['cpu_s'] / lines:.3f}",
         f"{1000 * side['upstream_cpu_s'] / lines:.3f}", str(side["requests"])]
        for name, side in (("direct (baseline)", direct), ("backfill: create -> completed", backfill))
    ]  # fmt: skip
    print(table(["side", "seconds", "lines/s", "CPU ms/line", "upstream CPU ms/line", "upstream requests"], rows))
    print("backfill phases (by polling): " + ", ".join(f"{s} {t:.2f} s" for s, t in backfill["phases"].items()))
    ratio = direct["seconds"] / backfill["seconds"]
    rate = lines / backfill["seconds"]
    print(
        f"\nratio backfill / direct (lines/s): {ratio:.1%}  (goal >= 25%: {'met' if ratio >= 0.25 else 'NOT met'}); "
        f"backfill {rate:.0f} lines/s (goal >= 20,000: {'met' if rate >= 20_000 else 'NOT met'})"
    )
    if args.profile:
        print(f"profile of the backfill server: {args.profile}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
