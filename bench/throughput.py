"""Throughput: lines per second through `backfill serve`, against the cookbook-style client-side processor.

Both sides send the same chat batch (default 50,000 lines, ~300 B of varied text each) to the same instant fake
upstream (`python -m backfill.testing.upstream`), at the same concurrency (default 64), with no rate limits:

    cookbook   bench/cookbook_client.py in its own process, --max-concurrency 64, results appended to a file
               (each line reaches the OS as it finishes; nothing is fsynced). Time: its own, from reading the
               first request to writing the last result.
    backfill   `backfill serve` (SQLite, default settings) whose one backend has max_concurrency 64; the file is
               uploaded first (not timed). Time: POST /v1/batches -> status `completed` seen by polling every
               100 ms, so it includes validation, dispatch, the group commits of every result to SQLite (durable
               across a crash) and finalization (the output file written and fsynced).

The sides run one at a time, never together, alternating which goes first when --repeat > 1. Every line must come
back exactly once with status 200 on both sides, or the script fails. Also printed: CPU seconds each side spent
(the backfill server or the cookbook process, and the upstream), which says more than wall time on a busy machine.
Goals: backfill/cookbook >= 1.0x (the first issue), >= 2x (issue 17).

    .venv/bin/python bench/throughput.py                       # 50,000 lines
    .venv/bin/python bench/throughput.py --quick               # 2,000 lines
    .venv/bin/python bench/throughput.py --profile bench/out/serve.svg   # py-spy on the server while it runs
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from harness import (
    MODEL,
    Children,
    Server,
    Upstream,
    children_cpu_s,
    cpu_s,
    machine_line,
    median,
    profiled,
    running,
    table,
    thread_cpu_s,
)

COOKBOOK = Path(__file__).resolve().parent / "cookbook_client.py"
POLL_S = 0.1
TERMINAL = {"completed", "failed", "expired", "cancelled"}
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")


def generate(path: Path, lines: int, text_chars: int = 300, seed: int = 20240611) -> list[str]:
    """Write `lines` chat requests; the same seed always gives the same bytes. Returns the custom ids."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    pool = " ".join(rng.choices(words, k=200_000))
    ids = [f"tp-{i:06d}" for i in range(lines)]
    with path.open("wb") as out:
        for custom_id in ids:
            start = rng.randrange(len(pool) - text_chars)
            body = {"model": MODEL, "messages": [{"role": "user", "content": pool[start : start + text_chars]}]}
            out.write(
                orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            )
            out.write(b"\n")
    return ids


def check_results(name: str, lines: list[dict[str, Any]], expected: list[str]) -> None:
    """Every expected custom id exactly once, each with a 200 response."""
    got = [line["custom_id"] for line in lines]
    if len(got) != len(expected) or set(got) != set(expected):
        missing = len(set(expected) - set(got))
        raise RuntimeError(f"{name}: {len(got)} results for {len(expected)} lines ({missing} missing, or duplicates)")
    bad = [line for line in lines if (line.get("response") or {}).get("status_code") != 200 or line.get("error")]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} results are not 200, e.g. {bad[0]}")


@dataclass
class Side:
    seconds: float
    cpu_s: float
    upstream_cpu_s: float
    upstream_requests: int
    main_thread_cpu_s: float | None = None
    phases: dict[str, float] | None = None


def run_cookbook(
    children: Children, upstream: Upstream, path: Path, workdir: Path, ids: list[str], concurrency: int
) -> Side:
    workdir.mkdir(parents=True, exist_ok=True)
    results, log = workdir / "results.jsonl", workdir / "cookbook.log"
    argv = [
        sys.executable, str(COOKBOOK), "--requests", str(path), "--results", str(results),
        "--base-url", upstream.url, "--max-concurrency", str(concurrency),
        "--max-requests-per-minute", "1e12", "--max-tokens-per-minute", "1e15",
    ]  # fmt: skip
    upstream.reset()
    cpu_before, upstream_before = children_cpu_s(), cpu_s(upstream.process.pid)
    process = children.start(argv, log)
    if process.wait() != 0:
        raise RuntimeError(f"cookbook client exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    cpu, upstream_cpu = children_cpu_s() - cpu_before, cpu_s(upstream.process.pid) - upstream_before
    summary = orjson.loads(log.read_text().strip().splitlines()[-1])
    check_results("cookbook", [orjson.loads(line) for line in results.read_bytes().splitlines()], ids)
    shutil.rmtree(workdir, ignore_errors=True)
    return Side(summary["seconds"], cpu, upstream_cpu, upstream.total())


def run_backfill(
    children: Children,
    upstream: Upstream,
    path: Path,
    workdir: Path,
    ids: list[str],
    concurrency: int,
    profile: Path | None,
) -> Side:
    backend = {"url": upstream.url, "max_concurrency": concurrency}
    server = Server.start(children, workdir, backend, {"max_lines": max(50_000, len(ids))})
    try:
        file_id = server.upload(path)["id"]
        upstream.reset()
        with profiled(children, server.pid, profile):
            cpu_before, upstream_before = cpu_s(server.pid), cpu_s(upstream.process.pid)
            main_before = thread_cpu_s(server.pid)[server.pid]
            started = time.perf_counter()
            batch = server.create_batch(file_id)
            first_seen: dict[str, float] = {batch["status"]: started}
            while batch["status"] not in TERMINAL:
                time.sleep(POLL_S)
                batch = server.batch(batch["id"])
                first_seen.setdefault(batch["status"], time.perf_counter())
            finished = first_seen[batch["status"]]
            cpu, upstream_cpu = cpu_s(server.pid) - cpu_before, cpu_s(upstream.process.pid) - upstream_before
            main_cpu = thread_cpu_s(server.pid)[server.pid] - main_before
        if batch["status"] != "completed" or batch["error_file_id"] is not None:
            raise RuntimeError(f"backfill: batch ended {batch['status']}: {batch}")
        output = [orjson.loads(line) for line in server.content(batch["output_file_id"]).splitlines()]
        check_results("backfill", output, ids)
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        server.stop(children)
    shutil.rmtree(workdir, ignore_errors=True)
    return Side(finished - started, cpu, upstream_cpu, upstream.total(), main_cpu, _phases(first_seen, finished))


def _phases(first_seen: dict[str, float], finished: float) -> dict[str, float]:
    """Seconds spent in each status, as seen by polling (a status shorter than one poll may go unseen)."""
    order = sorted(first_seen.items(), key=lambda item: item[1])
    return {status: (order[i + 1][1] if i + 1 < len(order) else finished) - t for i, (status, t) in enumerate(order)}


def report(lines: int, concurrency: int, cookbook: list[Side], backfill: list[Side]) -> None:
    print(f"\n{lines} lines, concurrency {concurrency}, instant upstream; medians of {len(backfill)} run(s)\n")
    rows = []
    for name, sides in (("cookbook client (baseline)", cookbook), ("backfill: create -> completed", backfill)):
        seconds = median([s.seconds for s in sides])
        rows.append(
            [
                name,
                f"{seconds:.2f}",
                f"{lines / seconds:.0f}",
                f"{1000 * median([s.cpu_s for s in sides]) / lines:.2f}",
                f"{1000 * median([s.upstream_cpu_s for s in sides]) / lines:.2f}",
                str(max(s.upstream_requests for s in sides)),
            ]
        )
    print(table(["side", "seconds", "lines/s", "CPU ms/line", "upstream CPU ms/line", "upstream requests"], rows))
    main_ms = 1000 * median([s.main_thread_cpu_s or 0.0 for s in backfill]) / lines
    print(
        f"\nbackfill server CPU ms/line: {main_ms:.2f} on its event-loop thread, "
        f"{1000 * median([s.cpu_s for s in backfill]) / lines - main_ms:.2f} on other threads (aiosqlite, to_thread)"
    )
    phases = backfill[-1].phases or {}
    print(
        f"backfill phases (run {len(backfill)}, by polling): "
        + ", ".join(f"{status} {s:.2f} s" for status, s in phases.items())
    )
    ratio = median([s.seconds for s in cookbook]) / median([s.seconds for s in backfill])
    verdict = "met" if ratio >= 2 else "NOT met"
    print(f"\nratio backfill / cookbook (lines/s): {ratio:.2f}x  (goal, issue 17: >= 2x: {verdict})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000, help="request lines in the batch (default 50,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, both sides (default 64)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating which goes first")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 2,000 lines")
    parser.add_argument("--profile", type=Path, help="py-spy the backfill server into this file (.svg, .json, .txt)")
    args = parser.parse_args(argv)
    lines = 2_000 if args.quick else args.lines
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-throughput-"))
    try:
        path = tmp / "requests.jsonl"
        ids = generate(path, lines)
        cookbook: list[Side] = []
        backfill: list[Side] = []
        with running() as children:
            upstream = Upstream.start(children)
            for run in range(args.repeat):
                for side in ("cookbook", "backfill") if run % 2 == 0 else ("backfill", "cookbook"):
                    if side == "cookbook":
                        cookbook.append(
                            run_cookbook(children, upstream, path, tmp / f"cookbook{run}", ids, args.concurrency)
                        )
                        result = cookbook[-1]
                    else:
                        profile = args.profile if run == 0 else None
                        work = tmp / f"backfill{run}"
                        backfill.append(run_backfill(children, upstream, path, work, ids, args.concurrency, profile))
                        result = backfill[-1]
                    print(f"run {run + 1}: {side} {lines / result.seconds:.0f} lines/s ({result.seconds:.2f} s)")
        report(lines, args.concurrency, cookbook, backfill)
        if args.profile:
            print(f"profile of the backfill server (run 1): {args.profile}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
