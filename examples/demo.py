"""`make demo`: start `backfill serve` on the embedded CPU engine, run two bundled batches end to end.

1. 200 product reviews classified positive/negative by SmolLM2-135M-Instruct (llama.cpp, CPU), each answer held to a
   JSON schema whose label is an enum (`response_format`), and scored against the known labels.
2. 20 product titles embedded with all-MiniLM-L6-v2; the nearest neighbour of each is printed.
Both models ship inside PyPI packages: nothing is downloaded at run time. The client is the official openai SDK.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from openai import OpenAI
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backfill.testing.processes import free_port

HERE = Path(__file__).resolve().parent
OUT = Path.cwd() / "demo-output"
console = Console()


@contextlib.contextmanager
def serving(port: int, work: Path) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    args = [sys.executable, "-m", "backfill", "serve", "--port", str(port), "--data-dir", str(work / "data")]
    with open(work / "serve.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(300):
            if process.poll() is not None:
                sys.exit(f"backfill serve exited with {process.returncode}; see {work / 'serve.log'}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(60)


def run_batch(client: OpenAI, path: Path, endpoint: str) -> list[dict[str, Any]]:
    uploaded = client.files.create(file=open(path, "rb"), purpose="batch")  # noqa: SIM115
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    console.print(f"[bold]{path.name}[/]: batch {batch.id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("validating", total=None)
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.3)
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
            done = (counts.completed + counts.failed) if counts else 0
            progress.update(task, description=batch.status, total=counts.total if counts else None, completed=done)
    counts, tokens = batch.request_counts, batch.usage.total_tokens if batch.usage else 0
    done = f"{counts.completed} of {counts.total} lines, {counts.failed} failed" if counts else ""
    console.print(f"  {batch.status}: {done}; {tokens:,} tokens")
    if batch.output_file_id is None:
        sys.exit(f"no output: {batch.errors}")
    output = client.files.content(batch.output_file_id).read()
    OUT.mkdir(exist_ok=True)
    (OUT / f"{path.stem}.output.jsonl").write_bytes(output)
    console.print(f"  results in {OUT / (path.stem + '.output.jsonl')}")
    return [orjson.loads(line) for line in output.splitlines()]


def label_of(result: dict[str, Any]) -> str | None:
    """The label a result line holds: its answer is JSON matching the batch's schema (`response_format`)."""
    if result.get("error") or result["response"]["status_code"] != 200:
        return None
    answer = orjson.loads(result["response"]["body"]["choices"][0]["message"]["content"])
    return str(answer["label"])


def show_reviews(results: list[dict[str, Any]]) -> None:
    reviews = {
        line["custom_id"]: line["body"]["messages"][1]["content"]
        for line in map(orjson.loads, (HERE / "reviews.jsonl").read_bytes().splitlines())
    }
    truth = orjson.loads((HERE / "reviews.labels.json").read_bytes())
    labels = {result["custom_id"]: label_of(result) for result in results}
    for custom_id in list(labels)[:6]:
        text = reviews[custom_id]
        shown = text if len(text) <= 62 else text[:61] + "…"
        console.print(f"  {shown:62} [bold]{labels[custom_id]}[/]", highlight=False)
    right = sum(labels[custom_id] == truth[custom_id] for custom_id in labels)
    console.print(f"  accuracy: {right}/{len(labels)} ({right / len(labels):.0%}) against reviews.labels.json")


def show_neighbours(results: list[dict[str, Any]]) -> None:
    titles = {
        line["custom_id"]: line["body"]["input"]
        for line in map(orjson.loads, (HERE / "products.jsonl").read_bytes().splitlines())
    }
    vectors = {r["custom_id"]: r["response"]["body"]["data"][0]["embedding"] for r in results}

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    for cid in list(vectors)[:6:2]:
        best = max((other for other in vectors if other != cid), key=lambda o: cosine(vectors[cid], vectors[o]))
        console.print(f"  {titles[cid]}\n    nearest: {titles[best]}", highlight=False)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="backfill-demo-"))
    port = free_port()
    console.print(f"[bold]backfill demo[/]: embedded CPU engine, data in {work}")
    with serving(port, work):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        show_reviews(run_batch(client, HERE / "reviews.jsonl", "/v1/chat/completions"))
        show_neighbours(run_batch(client, HERE / "products.jsonl", "/v1/embeddings"))


if __name__ == "__main__":
    main()
