"""Ingest: how fast `backfill serve` takes in a big batch file, and how much memory it needs to do it.

A 50,000-line, ~200 MB chat batch (about 4 KB of varied text a line, generated deterministically into a temporary
directory) is uploaded as a streaming multipart body (POST /v1/files), a batch is created on it, and the batch is
polled every 20 ms until it leaves `validating`. Three rates, in MB/s (10^6 bytes of input file a second):

    upload       POST /v1/files: stream, write the blob, fsync, register
    validation   batch created -> `in_progress` seen (split lines, parse and check each, insert 50,000 rows)
    ingest       upload started -> `in_progress` seen (the two above, plus the create call)

and the server's peak RSS growth: VmHWM (reset with /proc/PID/clear_refs just before) when `in_progress` is seen,
minus VmRSS when idle before the upload.

Baseline, measured in the same run and never at the same time: the floor -- this Python process reading the same
file line by line and orjson-parsing every line. Nothing that validates a line can beat it on one core.

The backend points at the fake upstream with a 1 s delay and max_concurrency 1, so dispatching the batch once it is
in progress costs next to nothing. Goals (issue): ingest >= 100 MB/s and RSS growth <= 150 MB on a 2-core machine.

    .venv/bin/python bench/ingest.py            # 50,000 lines, ~200 MB
    .venv/bin/python bench/ingest.py --quick    # 5,000 lines, ~20 MB
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

import orjson
from harness import (
    MB,
    MODEL,
    Children,
    KiB,
    Server,
    Upstream,
    machine_line,
    median,
    memory_kib,
    profiled,
    reset_peak_rss,
    running,
    table,
)

MAX_FILE_BYTES = 200 * 1024 * 1024  # the server's default max_file_bytes
POLL_S = 0.02
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")
_ODD_WORDS = ("naïve", "café", "Straße", "東京", "résumé", "«quoted»", '"quoted"', "back\\slash", "tab\there")


def generate(path: Path, lines: int, seed: int = 20240611) -> int:
    """Write `lines` chat requests of ~4 KB each; the same seed always gives the same bytes. Returns the size."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    words += [*_ODD_WORDS, "line\nbreak", "emoji🙂"] * 5  # escapes and multi-byte UTF-8, as real prompts have
    pool = " ".join(rng.choices(words, k=700_000))
    size = 0
    with path.open("wb") as out:
        for i in range(lines):
            length = rng.randint(3350, 4150)
            start = rng.randrange(len(pool) - length)
            line = orjson.dumps(
                {
                    "custom_id": f"ingest-{i:06d}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": "You are a careful assistant."},
                            {"role": "user", "content": pool[start : start + length]},
                        ],
                        "max_tokens": 64 + i % 200,
                        "temperature": (i % 10) / 10,
                    },
                }
            )
            out.write(line + b"\n")
            size += len(line) + 1
    return size


def parse_floor(path: Path) -> float:
    """Seconds to read `path` and orjson-parse every line, in this process."""
    started = time.perf_counter()
    with path.open("rb") as lines:
        for line in lines:
            orjson.loads(line)
    return time.perf_counter() - started


@dataclass
class Ingest:
    upload_s: float
    validation_s: float
    ingest_s: float
    idle_kib: int
    upload_peak_kib: int
    peak_kib: int
    after_kib: int


def ingest_once(children: Children, upstream: Upstream, path: Path, workdir: Path, profile: Path | None) -> Ingest:
    """Start a fresh server, ingest `path` (under py-spy if `profile` is a path), stop the server."""
    backend = {"url": upstream.url, "max_concurrency": 1}
    server = Server.start(children, workdir, backend)
    try:
        time.sleep(0.5)  # let startup settle before taking the idle RSS
        if not reset_peak_rss(server.pid):
            raise RuntimeError("cannot reset the server's peak RSS (/proc/PID/clear_refs): peak growth is unmeasurable")
        idle = memory_kib(server.pid)["VmRSS"]
        with profiled(children, server.pid, profile, rate_hz=1000):  # a short window: sample densely
            started = time.perf_counter()
            uploaded = server.upload(path)
            upload_done = time.perf_counter()
            upload_peak = memory_kib(server.pid)["VmHWM"]
            batch = server.create_batch(uploaded["id"])
            created = time.perf_counter()
            while batch["status"] == "validating":
                time.sleep(POLL_S)
                batch = server.batch(batch["id"])
            seen = time.perf_counter()
            memory = memory_kib(server.pid)
        if batch["status"] != "in_progress":
            raise RuntimeError(f"batch ended validation as {batch['status']!r}: {batch.get('errors')}")
        expected = sum(1 for _ in path.open("rb"))
        if batch["request_counts"]["total"] != expected:
            raise RuntimeError(f"batch has {batch['request_counts']['total']} lines, the file {expected}")
    except BaseException:
        sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
        raise
    finally:
        server.stop(children)
        shutil.rmtree(workdir, ignore_errors=True)
    return Ingest(
        upload_done - started, seen - created, seen - started, idle, upload_peak, memory["VmHWM"], memory["VmRSS"]
    )


def _summary(size: int, r: Ingest) -> str:
    return (
        f"upload {_rate(size, r.upload_s)}, validation {_rate(size, r.validation_s)}, ingest {_rate(size, r.ingest_s)}"
        f" MB/s; peak RSS growth {_mb(r.peak_kib - r.idle_kib)} MB"
    )


def _rate(size: int, seconds: float) -> str:
    return f"{size / MB / seconds:.1f}"


def _mb(kib: int) -> str:
    return f"{kib * KiB / MB:.0f}"


def report(size: int, lines: int, floors: list[float], runs: list[Ingest]) -> None:
    floor, upload = median(floors), median([r.upload_s for r in runs])
    validation, ingest = median([r.validation_s for r in runs]), median([r.ingest_s for r in runs])
    print(f"\ninput: {lines} lines, {size / MB:.1f} MB; medians of {len(runs)} run(s)\n")
    rows = [
        ["floor: read + orjson.loads every line (baseline)", f"{floor:.2f}", _rate(size, floor), "1.00"],
        ["upload: POST /v1/files", f"{upload:.2f}", _rate(size, upload), f"{floor / upload:.2f}"],
        [
            "validation: created -> in_progress",
            f"{validation:.2f}",
            _rate(size, validation),
            f"{floor / validation:.2f}",
        ],
        ["ingest: upload start -> in_progress", f"{ingest:.2f}", _rate(size, ingest), f"{floor / ingest:.2f}"],
    ]
    print(table(["phase", "seconds", "MB/s", "x floor"], rows))
    growth = median([(r.peak_kib - r.idle_kib) for r in runs])
    mem_rows = [
        ["server RSS, idle before upload", _mb(median([r.idle_kib for r in runs]))],
        ["peak RSS growth during upload", _mb(median([r.upload_peak_kib - r.idle_kib for r in runs]))],
        ["peak RSS growth during ingest", _mb(growth)],
        ["RSS growth kept once in_progress", _mb(median([r.after_kib - r.idle_kib for r in runs]))],
    ]
    print()
    print(table(["server memory", "MB"], mem_rows))
    ingest_rate, growth_mb = size / MB / ingest, growth * KiB / MB
    print(
        f"\nratio backfill ingest / floor: {floor / ingest:.2f}x"
        f"\ngoal ingest >= 100 MB/s: {ingest_rate:.1f} MB/s ({_verdict(ingest_rate >= 100)})"
        f"\ngoal peak RSS growth <= 150 MB: {growth_mb:.0f} MB ({_verdict(growth_mb <= 150)})"
    )


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000, help="request lines in the file (default 50,000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, alternating baseline/backfill order")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 5,000 lines (~20 MB)")
    parser.add_argument("--profile", type=Path, help="py-spy the server's first ingest into this file (.svg, .txt)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    lines = 5_000 if args.quick else args.lines
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-ingest-"))
    try:
        path = tmp / "ingest.jsonl"
        size = generate(path, lines)
        print(f"generated {path}: {lines} lines, {size / MB:.1f} MB")
        if size > MAX_FILE_BYTES:
            raise RuntimeError(f"{size} bytes is over the server's default max_file_bytes ({MAX_FILE_BYTES})")
        floors: list[float] = []
        runs: list[Ingest] = []
        with running() as children:
            upstream = Upstream.start(children, delay_ms=1000)
            for run in range(args.repeat):
                steps = ["floor", "backfill"] if run % 2 == 0 else ["backfill", "floor"]
                for step in steps:
                    if step == "floor":
                        floors.append(parse_floor(path))
                        print(f"run {run + 1}: floor {_rate(size, floors[-1])} MB/s")
                    else:
                        profile = args.profile if run == 0 else None
                        runs.append(ingest_once(children, upstream, path, tmp / f"server{run}", profile))
                        print(f"run {run + 1}: {_summary(size, runs[-1])}")
        report(size, lines, floors, runs)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
