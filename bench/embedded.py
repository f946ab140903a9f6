"""Embedded engine: chat output tokens/s of 200 lines through `backfill run`, against a plain sequential
llama-cpp-python loop over the same requests, side by side in one run.

    baseline            one `llama_cpp.Llama` (same GGUF, same threads), `create_chat_completion` line after line
    backfill, 1 slot    `backfill run` with embedded_chat_slots = 1: the whole pipeline, one sequence at a time
    backfill, N slots   `backfill run` with embedded_chat_slots = N: N sequences per forward pass

Every request is greedy (temperature 0) with the same max_tokens, so both sides generate comparable text; each
side's tokens/s is its own output tokens (from `usage`) over its own wall time. backfill's time is the whole
command: model load, validation, dispatch, group commits, finalization. Goals (issue 3): >= 1.0x with sequential
execution, >= 2x batched; DESIGN.md measured batching's ceiling on 2 cores at about 1.7-1.9x the sequential loop.

    .venv/bin/python bench/embedded.py                  # 200 lines, slots 1 and 8
    .venv/bin/python bench/embedded.py --quick          # 24 lines
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from harness import machine_line, table

SUBJECTS = ["a lamp", "a kettle", "running shoes", "a backpack", "a blender", "headphones", "a desk", "a tent",
            "a bicycle", "a camera", "a notebook", "a watch", "a scarf", "a teapot", "a chair", "a guitar"]  # fmt: skip


def make_lines(n: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2-135m-instruct",
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [
                    {"role": "user", "content": f"Write a short product description for {SUBJECTS[i % 16]} #{i}."}
                ],
            },
        }
        for i in range(n)
    ]


def sequential_loop(lines: list[dict[str, Any]], threads: int) -> tuple[float, int]:
    from llama_cpp import Llama

    from backfill.backends.embedded.backend import smollm2_gguf

    started = time.perf_counter()
    model = Llama(str(smollm2_gguf()), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = 0
    for line in lines:
        body = line["body"]
        reply: Any = model.create_chat_completion(
            body["messages"], max_tokens=body["max_tokens"], temperature=0.0, top_k=1
        )
        tokens += reply["usage"]["completion_tokens"]
    return time.perf_counter() - started, tokens


def backfill_run(input_path: Path, work: Path, slots: int, threads: int) -> tuple[float, int]:
    config = work / f"slots{slots}.toml"
    config.write_text(f"embedded_chat_slots = {slots}\nembedded_threads = {threads}\n")
    output = work / f"out-{slots}.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "backfill", "run", str(input_path), "-o", str(output), "--config", str(config)],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    results = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    if len(results) != len(input_path.read_bytes().splitlines()):
        raise SystemExit(f"backfill run with {slots} slots returned {len(results)} lines")
    return elapsed, sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="24 lines: a smoke run, not a figure")
    args = parser.parse_args()
    n = 24 if args.quick else args.lines
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="backfill-bench-embedded-"))
    input_path = work / "in.jsonl"
    input_path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in make_lines(n, args.max_tokens)))

    rows: list[tuple[str, float, int]] = []
    seconds, tokens = sequential_loop(make_lines(n, args.max_tokens), args.threads)
    rows.append(("sequential llama-cpp-python loop (baseline)", seconds, tokens))
    print(f"baseline: {tokens / seconds:.1f} tok/s", flush=True)
    for slots in args.slots:
        seconds, tokens = backfill_run(input_path, work, slots, args.threads)
        rows.append((f"backfill run, {slots} slot{'s' if slots > 1 else ''}", seconds, tokens))
        print(f"backfill {slots} slots: {tokens / seconds:.1f} tok/s", flush=True)

    base = rows[0][2] / rows[0][1]
    print(f"\n{n} lines, max_tokens {args.max_tokens}, greedy, {args.threads} threads\n")
    print(
        table(
            ["side", "seconds", "output tokens", "tok/s", "x baseline"],
            [[name, f"{s:.1f}", str(t), f"{t / s:.1f}", f"{t / s / base:.2f}"] for name, s, t in rows],
        )
    )


if __name__ == "__main__":
    main()
