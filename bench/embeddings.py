"""Embeddings: lines per second of an embeddings batch through `backfill serve`, beside the same inputs sent straight
to the upstream in requests of 256 inputs.

Both sides embed the same N one-input lines (default 20,000, ~100 B of varied text each) on the same instant fake
upstream (`python -m backfill.testing.upstream`), one at a time:

    direct     this process, httpx, the inputs in requests of 256 (`--direct-inputs`), `--concurrency` requests in
               flight: what a hand-written client that batches inputs itself gets. Time: first request to last
               answer, the fastest of `--direct-runs` (3) runs.
    backfill   `backfill serve` (SQLite, default settings) whose one backend has max_concurrency `--concurrency` and
               max_inputs_per_request 256; the file is uploaded first (not timed). Time: POST /v1/batches -> status
               `completed` seen by polling every 100 ms: validation, dispatch (lines coalesced into array requests
               and split back), the group commits of every result and finalization (the output file written).

`--dimensions D` has every line (and the direct side) ask for vectors of D floats, the size of a real model's
(768: bge-base, nomic-embed; 1536: text-embedding-3-small) rather than the fake upstream's 8: the result bodies
backfill stores and writes out grow with it.

`--workers N` runs N dispatcher processes: the server plus N-1 `backfill serve --role worker` on the same database
and data directory, as a user scales out on one machine; CPU then counts all of them.

Every line must come back exactly once with status 200 and one vector. Printed: lines/s of each side, the ratio
backfill / direct (the figure), CPU ms per line, the upstream requests each side made; and, from the server's own
log, when it validated and finished the batch (without the up to 100 ms a poll adds; the figure stays the polled
one, what a client sees), and from those the per-line budget: the µs a line may take at 25 % of the direct rate
beside what it took, validation and the rest.
Goals (issue 17): backfill >= 25 % of the direct rate, and >= 20,000 lines/s.

`--million` runs a 1,000,000-line batch through backfill alone (max_lines and max_embedding_inputs raised to fit,
max_file_bytes 1 GiB) and reports the server's peak RSS (VmHWM, never reset: from its start, through the upload,
validation, dispatch and finalization, to the output file written), its idle RSS before the upload, and how long
GET /v1/batches/{id} (what `backfill status` reads) took while the batch ran. Goal (issue 17): peak RSS < 300 MB.

    .venv/bin/python bench/embeddings.py                      # 20,000 lines
    .venv/bin/python bench/embeddings.py --quick              # 2,000 lines
    .venv/bin/python bench/embeddings.py --profile bench/out/embeddings.svg   # py-spy on the server
    .venv/bin/python bench/embeddings.py --dimensions 768     # vectors of a real model's size
    .venv/bin/python bench/embeddings.py --workers 2          # two dispatcher processes on one SQLite database
    .venv/bin/python bench/embeddings.py --million            # 1,000,000 lines: the server's peak RSS
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
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness import (
    MODEL,
    Children,
    Server,
    Upstream,
    cpu_s,
    machine_line,
    median,
    memory_kib,
    profiled,
    running,
    table,
)

POLL_S = 0.1
TERMINAL = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/embeddings"
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")


def generate(
    path: Path,
    lines: int,
    text_chars: int = 100,
    seed: int = 20261203,
    keep_texts: bool = True,
    dimensions: int | None = None,
) -> list[str]:
    """Write `lines` one-input embeddings requests (the same seed, the same bytes); returns the texts (none unless
    `keep_texts`). `dimensions`: the vector size each line asks for (the upstream's own, 8, when None)."""
    params = {} if dimensions is None else {"dimensions": dimensions}
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    pool = " ".join(rng.choices(words, k=100_000))
    texts = []
    with path.open("wb") as out:
        for i in range(lines):
            start = rng.randrange(len(pool) - text_chars)
            text = pool[start : start + text_chars]
            if keep_texts:
                texts.append(text)
            line = {
                "custom_id": f"em-{i:07d}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {"model": MODEL, "input": text, **params},
            }
            out.write(orjson.dumps(line) + b"\n")
    return texts


async def _direct(
    url: str, texts: list[str], per_request: int, concurrency: int, params: dict[str, Any]
) -> tuple[float, int]:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    got = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal got
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await client.post(f"{url}{ENDPOINT}", json={"model": MODEL, "input": chunk, **params})
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


def run_direct(
    upstream: Upstream, texts: list[str], per_request: int, concurrency: int, dimensions: int | None = None
) -> dict[str, float]:
    upstream.reset()
    upstream_before = cpu_s(upstream.process.pid)
    cpu_before = time.process_time()
    params = {} if dimensions is None else {"dimensions": dimensions}
    seconds, requests = asyncio.run(_direct(upstream.url, texts, per_request, concurrency, params))
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
    workers: int = 1,
    dimensions: int | None = None,
) -> dict[str, Any]:
    backend = {"name": "bench", "models": [MODEL], "url": upstream.url, "max_concurrency": concurrency}
    backend |= {"max_inputs_per_request": per_request, "max_tokens_per_request": 1_000_000}  # inputs are the bound
    settings = {"max_lines": max(50_000, lines)}
    server = Server.start_with(children, workdir, [backend], settings)
    # Further dispatcher processes, as a user runs them: `backfill serve --role worker` on the same database and
    # data directory. Each leases its own lines; SQLite's one writer is shared.
    extra = [
        Server.start_with(children, workdir / f"worker{n}", [backend], settings | {"role": "worker"}, workdir / "data")
        for n in range(1, workers)
    ]
    pids = [server.pid] + [worker.pid for worker in extra]
    try:
        file_id = server.upload(path)["id"]
        upstream.reset()
        with profiled(children, server.pid, profile):
            cpu_before, upstream_before = sum(cpu_s(pid) for pid in pids), cpu_s(upstream.process.pid)
            started, posted_at = time.perf_counter(), time.time()
            batch = server.create_batch(file_id, ENDPOINT)
            seen: dict[str, float] = {batch["status"]: started}
            while batch["status"] not in TERMINAL:
                time.sleep(POLL_S)
                batch = server.batch(batch["id"])
                seen.setdefault(batch["status"], time.perf_counter())
            finished = seen[batch["status"]]
            cpu = sum(cpu_s(pid) for pid in pids) - cpu_before
            upstream_cpu = cpu_s(upstream.process.pid) - upstream_before
        if batch["status"] != "completed" or batch["error_file_id"] is not None:
            raise RuntimeError(f"backfill: batch ended {batch['status']}: {batch}")
        output = [orjson.loads(line) for line in server.content(batch["output_file_id"]).splitlines()]
        ids = {line["custom_id"] for line in output}
        size = dimensions or 8
        ok = all(
            len(data := line["response"]["body"]["data"]) == 1 and len(data[0]["embedding"]) == size for line in output
        )
        if len(output) != lines or len(ids) != lines or not ok:
            raise RuntimeError(
                f"backfill: {len(output)} results ({len(ids)} distinct) for {lines} lines, or not one vector of {size}"
            )
        requests = httpx.get(f"{upstream.url}/_stats?log=0", timeout=30).json()["answered"][ENDPOINT]["requests"]
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        for worker in extra:
            worker.stop(children)
        server.stop(children)
    order = sorted(seen.items(), key=lambda item: item[1])
    phases = {s: (order[i + 1][1] if i + 1 < len(order) else finished) - t for i, (s, t) in enumerate(order)}
    return {
        "seconds": finished - started,
        "cpu_s": cpu,
        "upstream_cpu_s": upstream_cpu,
        "requests": requests,
        "phases": phases,
        "logged": logged_after(server.log_path, batch["id"], posted_at),
    }


def logged_after(log_path: Path, batch_id: str, posted_at: float) -> dict[str, float]:
    """Seconds from the POST to each of the batch's `batch.validated` and `batch.finished` log lines: when the
    server did it, without the lag of a poll every 100 ms (and of a GET waiting on a busy loop) that the polled
    figures carry. Same clock: the server runs on this machine."""
    at: dict[str, float] = {}
    for raw in log_path.read_bytes().splitlines():
        if not raw.startswith(b"{") or batch_id.encode() not in raw:
            continue
        entry = orjson.loads(raw)
        if entry.get("batch_id") == batch_id and entry.get("event") in ("batch.validated", "batch.finished"):
            stamp = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            at[entry["event"].removeprefix("batch.")] = stamp - posted_at
    return at


def run_million(
    children: Children, upstream: Upstream, path: Path, workdir: Path, lines: int, per_request: int, concurrency: int
) -> dict[str, Any]:
    """One `lines`-line batch through backfill: its time, and the server's memory from start to output file."""
    backend = {"url": upstream.url, "max_concurrency": concurrency, "max_inputs_per_request": per_request}
    backend["max_tokens_per_request"] = 1_000_000
    limits = {"max_lines": lines, "max_embedding_inputs": lines, "max_file_bytes": 1 << 30}
    server = Server.start(children, workdir, backend, limits)
    polls: list[float] = []
    try:
        time.sleep(0.5)  # let startup settle before taking the idle RSS
        idle = memory_kib(server.pid)["VmRSS"]
        started = time.perf_counter()
        file_id = server.upload(path)["id"]
        uploaded = time.perf_counter()
        batch = server.create_batch(file_id, ENDPOINT)
        seen: dict[str, float] = {batch["status"]: uploaded}
        while batch["status"] not in TERMINAL:
            time.sleep(POLL_S)
            asked = time.perf_counter()
            batch = server.batch(batch["id"])
            polls.append(time.perf_counter() - asked)
            seen.setdefault(batch["status"], time.perf_counter())
        finished = seen[batch["status"]]
        peak = memory_kib(server.pid)["VmHWM"]
        if batch["status"] != "completed" or batch["error_file_id"] is not None:
            raise RuntimeError(f"backfill: batch ended {batch['status']}: {batch}")
        got = _count_output(server, batch["output_file_id"])
        if got != lines:
            raise RuntimeError(f"backfill: {got} distinct results for {lines} lines")
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        server.stop(children)
    order = sorted(seen.items(), key=lambda item: item[1])
    phases = {s: (order[i + 1][1] if i + 1 < len(order) else finished) - t for i, (s, t) in enumerate(order)}
    return {
        "upload_s": uploaded - started,
        "batch_s": finished - uploaded,
        "phases": phases,
        "idle_mb": idle * 1024 / 1e6,  # VmRSS and VmHWM are in KiB; MB here as in the issue (10**6 bytes)
        "peak_mb": peak * 1024 / 1e6,
        "poll_median_ms": 1000 * median(polls),
        "poll_max_ms": 1000 * max(polls),
    }


def _count_output(server: Server, file_id: str) -> int:
    """Distinct custom_ids in the output file, each with one vector, read as a stream (never whole)."""
    seen = bytearray(0)
    got = 0
    with server.client.stream("GET", f"/files/{file_id}/content") as response:
        response.raise_for_status()
        for raw in response.iter_lines():
            if not raw:
                continue
            line = orjson.loads(raw)
            index = int(line["custom_id"].removeprefix("em-"))
            if index >= len(seen):
                seen.extend(bytes(index + 1 - len(seen)))
            if seen[index] or len(line["response"]["body"]["data"]) != 1:
                raise RuntimeError(f"backfill: {line['custom_id']} twice, or not one vector")
            seen[index] = 1
            got += 1
    return got


def main_million(lines: int, per_request: int, concurrency: int) -> int:
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-embeddings-"))
    try:
        path = tmp / "requests.jsonl"
        generate(path, lines, keep_texts=False)
        size_mb = path.stat().st_size / 1e6
        with running() as children:
            upstream = Upstream.start(children)
            result = run_million(children, upstream, path, tmp / "backfill", lines, per_request, concurrency)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{lines} one-input lines ({size_mb:.0f} MB), {per_request} inputs a request, {concurrency} in flight\n")
    rows = [
        ["upload (POST /v1/files)", f"{result['upload_s']:.1f}", ""],
        ["batch: create -> completed", f"{result['batch_s']:.1f}", f"{lines / result['batch_s']:.0f}"],
    ]
    print(table(["phase", "seconds", "lines/s"], rows))
    print("backfill phases (by polling): " + ", ".join(f"{s} {t:.1f} s" for s, t in result["phases"].items()))
    peak = result["peak_mb"]
    print(
        f"server RSS: idle {result['idle_mb']:.0f} MB, peak (VmHWM, start to output file) {peak:.0f} MB "
        f"(goal < 300 MB: {'met' if peak < 300 else 'NOT met'}); GET /v1/batches/{{id}} while it ran: median "
        f"{result['poll_median_ms']:.1f} ms, slowest {result['poll_max_ms']:.1f} ms"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000, help="one-input lines in the batch (default 20,000)")
    parser.add_argument("--direct-inputs", type=int, default=256, help="inputs a request, both sides (default 256)")
    parser.add_argument("--direct-runs", type=int, default=3, help="direct runs, the fastest kept (default 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight, both sides (default 8)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 2,000 lines")
    parser.add_argument("--profile", type=Path, help="py-spy the backfill server into this file (.svg, .json, .txt)")
    parser.add_argument("--million", action="store_true", help="1,000,000 lines through backfill: its peak RSS")
    parser.add_argument(
        "--dimensions",
        type=int,
        help="vector size every line asks for (OpenAI's `dimensions`; default: the upstream's 8), e.g. 768",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="dispatcher processes: the server plus N-1 `backfill serve --role worker` on its database (default 1)",
    )
    args = parser.parse_args(argv)
    if args.million:
        return main_million(1_000_000 if args.lines == 20_000 else args.lines, args.direct_inputs, args.concurrency)
    lines = 2_000 if args.quick else args.lines
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-embeddings-"))
    try:
        path = tmp / "requests.jsonl"
        texts = generate(path, lines, dimensions=args.dimensions)
        with running() as children:
            upstream = Upstream.start(children)
            # The fastest of a few runs: one run takes a fraction of a second, and a stall of this noisy machine
            # in it made the direct side slow enough once to show the ratio goal as met.
            runs = [
                run_direct(upstream, texts, args.direct_inputs, args.concurrency, args.dimensions)
                for _ in range(args.direct_runs)
            ]
            direct = min(runs, key=lambda run: run["seconds"])
            shown = ", ".join(f"{run['seconds']:.2f}" for run in runs)
            print(f"direct: {lines / direct['seconds']:.0f} inputs/s ({direct['seconds']:.2f} s, fastest of {shown})")
            work = tmp / "backfill"
            backfill = run_backfill(
                children,
                upstream,
                path,
                work,
                lines,
                args.direct_inputs,
                args.concurrency,
                args.profile,
                args.workers,
                args.dimensions,
            )
            print(f"backfill: {lines / backfill['seconds']:.0f} lines/s ({backfill['seconds']:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    processes = "1 backfill process" if args.workers == 1 else f"{args.workers} backfill processes (1 + workers)"
    shape = f"{lines} one-input lines, {args.direct_inputs} inputs a request, {args.concurrency} in flight"
    shape += f", {args.dimensions or 8} dimensions"
    print(f"\n{shape}, {processes}\n")
    rows = [
        [name, f"{side['seconds']:.2f}", f"{lines / side['seconds']:.0f}", f"{1000 * side['cpu_s'] / lines:.3f}",
         f"{1000 * side['upstream_cpu_s'] / lines:.3f}", str(side["requests"])]
        for name, side in (("direct (baseline)", direct), ("backfill: create -> completed", backfill))
    ]  # fmt: skip
    print(table(["side", "seconds", "lines/s", "CPU ms/line", "upstream CPU ms/line", "upstream requests"], rows))
    print("backfill phases (by polling): " + ", ".join(f"{s} {t:.2f} s" for s, t in backfill["phases"].items()))
    logged = backfill["logged"]
    if "finished" in logged:
        print(
            f"backfill by the server's log: validated {logged.get('validated', float('nan')):.2f} s and finished "
            f"{logged['finished']:.2f} s after the POST: {lines / logged['finished']:.0f} lines/s (the figures above "
            "are by polling, as a client sees them)"
        )
        # Where the goal's budget goes: what a line may cost at 25 % of the direct rate, and what it cost in each part.
        budget_us = 1e6 * direct["seconds"] / lines / 0.25
        validated_us = 1e6 * logged.get("validated", float("nan")) / lines
        print(
            f"per line: the 25 % goal allows {budget_us:.1f} µs from the POST to the output file; backfill took "
            f"{1e6 * logged['finished'] / lines:.1f} µs by its log: validation {validated_us:.1f}, dispatch and "
            f"finalization {1e6 * logged['finished'] / lines - validated_us:.1f}"
        )
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
