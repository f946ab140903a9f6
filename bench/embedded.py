"""Embedded engine: chat output tokens/s of 200 lines through `backfill run`, against a plain sequential
llama-cpp-python loop over the same requests, side by side in one run.

    baseline              one `llama_cpp.Llama` on the GGUF a user has (the shipped Q4_1 file, same threads),
                          `create_chat_completion` line after line
    sequential, converted the same loop on the converted weights backfill loads with several slots (Q8_0 by
                          default): how much of the gain is the weight format alone, without batching
    backfill, 1 slot      `backfill run` with embedded_chat_slots = 1: the whole pipeline, one sequence at a time
    backfill, N slots     `backfill run` with embedded_chat_slots = N: N sequences per forward pass

Every request is greedy (temperature 0) with the same max_tokens, so all sides generate comparable text; each
side's tokens/s is its own output tokens (from `usage`) over its own wall time. backfill's time is the whole
command: model load, validation, dispatch, group commits, finalization. The one-time conversion of the shipped
file into the cache is done (or found) first and reported on its own line, outside every side's time. Goals
(issue 3): >= 1.0x with sequential execution, >= 2x batched.

    .venv/bin/python bench/embedded.py                  # 200 lines, slots 1 and 8
    .venv/bin/python bench/embedded.py --quick          # 24 lines
    .venv/bin/python bench/embedded.py --slots 8 --schema   # and with a JSON schema (issue 20: >= 0.8x)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from harness import machine_line, table

if TYPE_CHECKING:
    from backfill.backends.embedded.weights import WeightType

SUBJECTS = ["a lamp", "a kettle", "running shoes", "a backpack", "a blender", "headphones", "a desk", "a tent",
            "a bicycle", "a camera", "a notebook", "a watch", "a scarf", "a teapot", "a chair", "a guitar"]  # fmt: skip


# The same task held to a JSON schema (`--schema`): the answer is an object, built token by token under a grammar.
DESCRIPTION_SCHEMA = {
    "type": "object",
    "properties": {"product": {"type": "string"}, "description": {"type": "string"}},
    "required": ["product", "description"],
    "additionalProperties": False,
}


def make_lines(n: int, max_tokens: int, schema: bool = False) -> list[dict[str, Any]]:
    response_format = {"type": "json_schema", "json_schema": {"name": "description", "schema": DESCRIPTION_SCHEMA}}
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
                **({"response_format": response_format} if schema else {}),
            },
        }
        for i in range(n)
    ]


def converted_gguf(weights: str, threads: int) -> Path:
    """The converted file backfill loads, made now if the cache lacks it (the time is printed, not counted)."""
    from backfill.backends.embedded.backend import smollm2_gguf
    from backfill.backends.embedded.weights import cached_path, prepared_gguf

    source = smollm2_gguf()
    if weights == "shipped":
        return source
    existed = cached_path(source, cast("WeightType", weights)).exists()
    started = time.perf_counter()
    path = prepared_gguf(source, cast("WeightType", weights), threads=threads)
    if path == source:
        raise SystemExit(f"could not convert {source} to {weights} (see the warning above)")
    how = "found in the cache" if existed else f"converted in {time.perf_counter() - started:.1f}s (first use)"
    print(f"weights: {source.name} -> {path} ({path.stat().st_size / 2**20:.0f} MiB), {how}", flush=True)
    return path


def sequential_loop(lines: list[dict[str, Any]], threads: int, model_path: Path) -> tuple[float, int]:
    from llama_cpp import Llama

    started = time.perf_counter()
    model = Llama(str(model_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = 0
    for line in lines:
        body = line["body"]
        reply: Any = model.create_chat_completion(
            body["messages"], max_tokens=body["max_tokens"], temperature=0.0, top_k=1
        )
        tokens += reply["usage"]["completion_tokens"]
    return time.perf_counter() - started, tokens


def backfill_run(input_path: Path, work: Path, slots: int, threads: int, weights: str) -> tuple[float, int]:
    config = work / f"slots{slots}.toml"
    config.write_text(
        f'embedded_chat_slots = {slots}\nembedded_threads = {threads}\nembedded_chat_weights = "{weights}"\n'
    )
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
    parser.add_argument("--weights", default="auto", choices=["auto", "q8_0", "q4_0", "f16", "shipped"])
    parser.add_argument("--quick", action="store_true", help="24 lines: a smoke run, not a figure")
    parser.add_argument(
        "--schema",
        action="store_true",
        help="also each slot count with the lines held to a JSON schema (response_format), and the ratio",
    )
    args = parser.parse_args()
    n = 24 if args.quick else args.lines
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="backfill-bench-embedded-"))
    input_path = work / "in.jsonl"
    input_path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in make_lines(n, args.max_tokens)))

    from backfill.backends.embedded.backend import smollm2_gguf
    from backfill.backends.embedded.weights import resolve

    shipped = smollm2_gguf()
    batched = resolve(cast("WeightType", args.weights), 2)  # what several slots load
    converted = converted_gguf(batched, args.threads)
    label = "Q4_1" if converted == shipped else batched.upper()
    rows: list[tuple[str, float, int]] = []
    ratios: list[str] = []
    schema_path = work / "in-schema.jsonl"
    schema_path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in make_lines(n, args.max_tokens, True)))
    seconds, tokens = sequential_loop(make_lines(n, args.max_tokens), args.threads, shipped)
    rows.append(("sequential llama-cpp-python loop, shipped Q4_1 (baseline)", seconds, tokens))
    print(f"baseline: {tokens / seconds:.1f} tok/s", flush=True)
    if converted != shipped:
        seconds, tokens = sequential_loop(make_lines(n, args.max_tokens), args.threads, converted)
        rows.append((f"sequential llama-cpp-python loop, converted {label}", seconds, tokens))
        print(f"sequential {label}: {tokens / seconds:.1f} tok/s", flush=True)
    for slots in args.slots:
        seconds, tokens = backfill_run(input_path, work, slots, args.threads, args.weights)
        used = resolve(cast("WeightType", args.weights), slots)
        weights = "shipped Q4_1" if used == "shipped" else used.upper()
        rows.append((f"backfill run, {weights}, {slots} slot{'s' if slots > 1 else ''}", seconds, tokens))
        print(f"backfill {slots} slots: {tokens / seconds:.1f} tok/s", flush=True)
        if args.schema:
            free_rate = tokens / seconds
            seconds, tokens = backfill_run(schema_path, work, slots, args.threads, args.weights)
            rows.append(
                (f"backfill run, {weights}, {slots} slot{'s' if slots > 1 else ''}, json_schema", seconds, tokens)
            )
            ratios.append(f"{slots} slot{'s' if slots > 1 else ''}: {tokens / seconds / free_rate:.2f}x")
            print(f"backfill {slots} slots, json_schema: {tokens / seconds:.1f} tok/s", flush=True)

    base = rows[0][2] / rows[0][1]
    load = os.getloadavg()
    print(
        f"\n{n} lines, max_tokens {args.max_tokens}, greedy, {args.threads} threads; load average at the end ", end=""
    )
    print(f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(
        table(
            ["side", "seconds", "output tokens", "tok/s", "x baseline"],
            [[name, f"{s:.1f}", str(t), f"{t / s:.1f}", f"{t / s / base:.2f}"] for name, s, t in rows],
        )
    )
    if ratios:
        print(f"\njson_schema vs the same lines free, output tokens/s (goal >= 0.8x): {', '.join(ratios)}")


if __name__ == "__main__":
    main()
