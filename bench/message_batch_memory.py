"""Message batch create: how much memory N concurrent maximal creates take, and whether /healthz keeps answering.

A maximal create body is generated once into a temporary directory: 100,000 requests (the default
message_batch_max_requests) of ~2.5 KB of varied text each, ~250 MB in all, just under the default
message_batch_max_bytes (256 MiB). It is streamed from the file by each client, so the benchmark holds none of it.

For each N in --concurrency (default 1 and 4): a fresh `backfill serve` (SQLite, default limits) takes N creates of
that body at once while this process GETs /healthz every 50 ms. Reported: the server's peak RSS growth (VmHWM, reset
with /proc/PID/clear_refs just before, minus VmRSS when idle) plus the peak RSS of the processes it started meanwhile
(the worker process that translates large bodies, and multiprocessing's resource tracker), its ratio to the
baseline -- N bodies held in memory once each, what any server that reads a body whole needs at the least -- and
the slowest /healthz answer. `--threads-too` adds, side by side, the same N with the translation in threads of the
server process (message_batch_offload_bytes above the body's size), as it was before the worker process.

The backend points at the fake upstream with a 1 s delay and max_concurrency 1, and each batch is cancelled once
created, so running the batches costs next to nothing.

    .venv/bin/python bench/message_batch_memory.py                 # N = 1 and 4, ~250 MB bodies
    .venv/bin/python bench/message_batch_memory.py --quick         # N = 1 and 2, 10,000 requests (~25 MB)
    .venv/bin/python bench/message_batch_memory.py --concurrency 4 --threads-too   # worker process vs threads
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness import MB, MODEL, Children, KiB, Server, Upstream, machine_line, memory_kib, reset_peak_rss, running, table

MAX_BODY_BYTES = 256 * 1024 * 1024  # the server's default message_batch_max_bytes
HEALTH_EVERY_S = 0.05
GOAL_HEALTHZ_S = 0.1
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")


def generate(path: Path, requests: int, seed: int = 20260611) -> int:
    """Write a create body of `requests` requests of ~2.5 KB each; the same seed gives the same bytes. Its size."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    words += ["naïve", "東京", '"quoted"', "back\\slash", "line\nbreak", "emoji🙂"] * 5
    pool = " ".join(rng.choices(words, k=500_000))
    size = 0
    with path.open("wb") as out:
        out.write(b'{"requests": [')
        for i in range(requests):
            start = rng.randrange(len(pool) - 2600)
            text = pool[start : start + rng.randint(2200, 2600)]
            params = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
            out.write((b"," if i else b"") + orjson.dumps({"custom_id": f"req-{i:06d}", "params": params}))
        out.write(b"]}")
        size = out.tell()
    return size


def poll_health(url: str, done: Any, results: Any) -> None:
    """GET `url` every HEALTH_EVERY_S until `done` is set; send back how long each answer took."""
    latencies = []
    with httpx.Client(timeout=30) as http:
        while not done.is_set():
            started = time.perf_counter()
            http.get(url).raise_for_status()
            latencies.append(time.perf_counter() - started)
            done.wait(HEALTH_EVERY_S)
    results.send(latencies)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as body:
        while chunk := body.read(1 << 16):
            yield chunk


def children_peak_kib(pid: int) -> int:
    """The summed peak RSS of `pid`'s child processes now (those started since the server's idle reading)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # it has just exited
                total += memory_kib(int(child)).get("VmHWM", 0)
    return total


class ChildrenPeak(threading.Thread):
    """The largest summed peak RSS of `pid`'s child processes, read every 20 ms: the server replaces its worker
    process after each task, so the worker that did the work is gone by the end."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak_kib = max(self.peak_kib, children_peak_kib(self.pid))


@dataclass
class Run:
    path: str  # where the body was translated: "process" or "threads"
    concurrency: int
    idle_kib: int
    peak_kib: int  # the server's, plus its child processes'
    workers_kib: int  # of which its child processes'
    seconds: float
    slowest_healthz_s: float
    healthz_answers: int


def create_at_once(
    children: Children, upstream: Upstream, body: Path, workdir: Path, concurrency: int, path: str
) -> Run:
    """A fresh server takes `concurrency` creates of `body` at once while /healthz is polled."""
    settings = {"message_batch_offload_bytes": 2 * MAX_BODY_BYTES} if path == "threads" else {}
    server = Server.start(children, workdir, {"url": upstream.url, "max_concurrency": 1}, settings)
    base = f"http://127.0.0.1:{server.port}"
    try:
        time.sleep(0.5)  # let startup settle before taking the idle RSS
        if not reset_peak_rss(server.pid):
            raise RuntimeError("cannot reset the server's peak RSS (/proc/PID/clear_refs): peak growth is unmeasurable")
        idle = memory_kib(server.pid)["VmRSS"]
        errors: list[str] = []

        def create() -> None:
            with httpx.Client(timeout=900) as http:
                headers = {"content-type": "application/json", "content-length": str(body.stat().st_size)}
                response = http.post(f"{base}/v1/messages/batches", content=_file_chunks(body), headers=headers)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:300]}")
                    return
                http.post(f"{base}/v1/messages/batches/{response.json()['id']}/cancel").raise_for_status()

        # The poller has a process of its own: in this one it would wait on the upload threads' GIL, and time that.
        receive, send = multiprocessing.Pipe(duplex=False)
        done = multiprocessing.Event()
        poller = multiprocessing.Process(target=poll_health, args=(f"{base}/healthz", done, send))
        creators = [threading.Thread(target=create) for _ in range(concurrency)]
        children_peak = ChildrenPeak(server.pid)
        children_peak.start()
        started = time.perf_counter()
        poller.start()
        for thread in creators:
            thread.start()
        for thread in creators:
            thread.join()
        seconds = time.perf_counter() - started
        children_peak.done.set()
        children_peak.join()
        workers = max(children_peak.peak_kib, children_peak_kib(server.pid))
        peak = memory_kib(server.pid)["VmHWM"] + workers
        done.set()
        latencies: list[float] = receive.recv()
        poller.join()
        if errors:
            raise RuntimeError(f"create failed: {errors[0]}")
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        server.stop(children)
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(path, concurrency, idle, peak, workers, seconds, max(latencies), len(latencies))


def _mb(kib: float) -> str:
    return f"{kib * KiB / MB:.0f}"


def report(size: int, requests: int, runs: Sequence[Run]) -> None:
    print(f"\nbody: {requests} requests, {size / MB:.1f} MB; baseline: N bodies held in memory once each\n")
    rows = []
    for run in runs:
        growth_kib = run.peak_kib - run.idle_kib
        baseline_kib = run.concurrency * size / KiB
        rows.append(
            [
                f"{run.concurrency} at once",
                run.path,
                f"{run.seconds:.1f}",
                _mb(run.idle_kib),
                _mb(growth_kib),
                _mb(run.workers_kib),
                _mb(baseline_kib),
                f"{growth_kib / baseline_kib:.2f}",
                f"{run.slowest_healthz_s * 1000:.0f}",
                str(run.healthz_answers),
            ]
        )
    print(
        table(
            [
                "creates",
                "translated in",
                "seconds",
                "idle MB",
                "peak growth MB",
                "of which child processes MB",
                "baseline MB",
                "x baseline",
                "slowest /healthz ms",
                "polls",
            ],
            rows,
        )
    )
    shipped = [run for run in runs if run.path == "process"]
    worst = max(shipped, key=lambda run: run.concurrency)
    growth_mb = (worst.peak_kib - worst.idle_kib) * KiB / MB
    per_create = max((run.peak_kib - run.idle_kib) * KiB / MB / run.concurrency for run in shipped)
    slowest = max(run.slowest_healthz_s for run in shipped)
    for run in runs:
        if run.path == "threads":
            twin = next((done for done in shipped if done.concurrency == run.concurrency), None)
            if twin is not None:
                print(
                    f"{run.concurrency} at once, slowest /healthz: worker process "
                    f"{twin.slowest_healthz_s * 1000:.0f} ms vs threads {run.slowest_healthz_s * 1000:.0f} ms "
                    f"({twin.slowest_healthz_s / run.slowest_healthz_s:.2f}x)"
                )
    print(
        f"\npeak RSS growth with {worst.concurrency} concurrent maximal creates: {growth_mb:.0f} MB "
        f"({per_create:.0f} MB a create at most)"
        f"\ngoal /healthz < {GOAL_HEALTHZ_S * 1000:.0f} ms throughout: slowest {slowest * 1000:.0f} ms "
        f"({'met' if slowest < GOAL_HEALTHZ_S else 'NOT met'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the body (default 100,000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="creates at once (default 1 4)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 10,000 requests, 1 and 2 at once")
    parser.add_argument(
        "--threads-too", action="store_true", help="also each N with the translation in threads, side by side"
    )
    args = parser.parse_args(argv)
    requests, concurrency = (10_000, [1, 2]) if args.quick else (args.requests, args.concurrency)
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-mbmem-"))
    try:
        body = tmp / "create.json"
        size = generate(body, requests)
        print(f"generated {body}: {requests} requests, {size / MB:.1f} MB")
        if size > MAX_BODY_BYTES:
            raise RuntimeError(f"{size} bytes is over the server's default message_batch_max_bytes ({MAX_BODY_BYTES})")
        runs: list[Run] = []
        with running() as children:
            upstream = Upstream.start(children, delay_ms=1000)
            paths = ["process", "threads"] if args.threads_too else ["process"]
            for n in concurrency:
                for path in paths:
                    runs.append(create_at_once(children, upstream, body, tmp / f"server{n}-{path}", n, path))
                    run = runs[-1]
                    print(
                        f"{n} at once ({path}): {run.seconds:.1f} s, peak RSS growth "
                        f"{_mb(run.peak_kib - run.idle_kib)} MB, slowest /healthz {run.slowest_healthz_s * 1000:.0f} ms"
                    )
        report(size, requests, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
