"""Result cache (issue 21): wall time of re-running an eval suite with 1 % of its cases changed, cache on versus off.

Real processes, wall clock: `backfill serve` (SQLite, default settings but for the one backend) in front of
`backfill sim serve` (the default profile, a vLLM-like H100 serving an 8B model, in real time), which counts the
requests it receives. The suite: N chat cases (default 5,000), temperature 0, ~200 characters of prompt, answers of
`--output-tokens` tokens (fixed length), random custom_ids as eval tools write them. Four batches, one after another:

    first run, cache off      another suite of the same shape, `backfill_result_cache: "false"`: a first run
                              (not the suite itself: the engine's prefix cache would favour whichever ran second)
    first run, cache on       the suite, cache on: every line runs (the cache is empty) and is kept; the cost of
                              keeping, beside the row above
    re-run 1 % changed, off   1 % of the suite's cases reworded, cache off: every line runs again
    re-run 1 % changed, on    the same, cache on: only the changed cases reach the engine

A warm-up batch of yet other cases runs first, untimed. Time: POST /v1/batches -> status `completed` seen by
polling every 100 ms (upload not timed). Printed: each row's wall time, lines sent to the engine (the simulator's
count) and the ratio of the two re-runs (the figure).

    .venv/bin/python bench/result_cache.py              # 5,000 cases
    .venv/bin/python bench/result_cache.py --quick      # 1,000 cases
    .venv/bin/python bench/result_cache.py --quick --profile bench/out/result_cache.txt   # py-spy, cached re-run
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness import Children, Server, free_port, machine_line, profiled, running, table, wait_http

SIM_MODEL = "sim-8b"


def suite(cases: int, changed: set[int], seed: int = 21) -> list[bytes]:
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    lines = []
    for i in range(cases):
        text = f"Case {i}: " + " ".join(rng.choice(words) for _ in range(28))
        if i in changed:
            text += " (reworded)"
        body = {"model": SIM_MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0}
        line = {"custom_id": uuid.uuid4().hex, "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append(orjson.dumps(line) + b"\n")
    return lines


def with_max_tokens(lines: list[bytes], output_tokens: int) -> list[bytes]:
    out = []
    for raw in lines:
        line = orjson.loads(raw)
        line["body"]["max_tokens"] = output_tokens
        out.append(orjson.dumps(line) + b"\n")
    return out


def engine_requests(sim_url: str) -> int:
    return int(httpx.get(f"{sim_url}/_stats?log=0", timeout=30).json()["total"])


def run_batch(server: Server, path: Path, cache: bool) -> tuple[float, dict[str, Any]]:
    file_id = server.upload(path)["id"]
    payload = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"backfill_result_cache": "true" if cache else "false"},
    }
    started = time.monotonic()
    response = server.client.post("/batches", json=payload)
    response.raise_for_status()
    batch = response.json()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.1)
        batch = server.batch(batch["id"])
    elapsed = time.monotonic() - started
    if batch["status"] != "completed" or batch["request_counts"]["failed"]:
        raise RuntimeError(f"batch ended {batch['status']} with counts {batch['request_counts']}")
    return elapsed, batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of cases reworded in the re-run")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="the backend's max_concurrency")
    parser.add_argument("--quick", action="store_true", help="1,000 cases")
    parser.add_argument("--profile", type=Path, help="py-spy the server during the cached re-run (.svg, .json, .txt)")
    args = parser.parse_args(argv)
    cases = 1000 if args.quick else args.cases
    changed = set(random.Random(5).sample(range(cases), max(1, round(cases * args.changed))))

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp, running() as children:
        workdir = Path(tmp)
        profile = workdir / "profile.toml"
        profile.write_text(f"output_len_dist = 'fixed'\noutput_len_mean = {args.output_tokens}\n")
        sim_url = start_sim(children, profile, workdir)
        backend = {
            "name": "sim", "url": sim_url, "models": [SIM_MODEL], "flavour": "vllm", "priority": "off",
            "max_concurrency": args.concurrency,
        }  # fmt: skip
        server = Server.start_with(children, workdir / "serve", [backend])
        # Warm-up, not timed: the engine's and the server's first minutes (adaptive concurrency finding its level,
        # caches, the database) would otherwise be charged to whichever row runs first.
        warm = workdir / "warm.jsonl"
        warm.write_bytes(b"".join(with_max_tokens(suite(min(cases, 1000), set(), seed=99), args.output_tokens)))
        run_batch(server, warm, cache=False)
        rows = []
        timings: dict[str, float] = {}
        for name, which, cache in (
            ("first run, cache off", "other", False),
            ("first run, cache on", "first", True),
            (f"re-run {args.changed:.0%} changed, cache off", "rerun", False),
            (f"re-run {args.changed:.0%} changed, cache on", "rerun", True),
        ):
            path = workdir / f"{which}-{cache}.jsonl"
            # Fresh custom_ids each run, as eval tools write them; the requests are the suite's.
            if which == "other":
                lines = suite(cases, set(), seed=31)
            else:
                lines = suite(cases, changed if which == "rerun" else set())
            path.write_bytes(b"".join(with_max_tokens(lines, args.output_tokens)))
            before = engine_requests(sim_url)
            profile = args.profile if name.startswith("re-run") and cache else None
            with profiled(children, server.pid, profile):
                elapsed, _ = run_batch(server, path, cache)
            sent = engine_requests(sim_url) - before
            timings[name] = elapsed
            rows.append([name, f"{cases:,}", f"{sent:,}", f"{elapsed:.1f}", f"{cases / elapsed:,.0f}"])
            print(f"  {name}: {elapsed:.1f} s, {sent} lines sent to the engine", file=sys.stderr)
        server.stop(children)

    off, on = timings[rows[2][0]], timings[rows[3][0]]
    keep_off, keep_on = timings[rows[0][0]], timings[rows[1][0]]
    print(machine_line())
    print(f"eval suite of {cases:,} chat cases (temperature 0, {args.output_tokens} output tokens), "
          f"{len(changed)} reworded in the re-run; sim default profile in real time, max_concurrency "
          f"{args.concurrency}")  # fmt: skip
    print(table(["run", "lines", "sent to engine", "wall s", "lines/s"], rows))
    print(f"re-run wall time, cache on / cache off: {on / off:.3f} ({off / on:.1f}x faster)")
    print(f"first run wall time, cache on (keeping) / cache off: {keep_on / keep_off:.3f}")
    return 0


def start_sim(children: Children, profile: Path, workdir: Path) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile)]
    process = children.start(argv, workdir / "sim.log")
    wait_http(f"http://127.0.0.1:{port}/health", process)
    return f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    sys.exit(main())
