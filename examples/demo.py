"""`make demo`: start `backfill serve`, run the bundled batch of 200 product reviews end to end, show results.

Until the embedded CPU engine lands, the backend is backfill's built-in test upstream
(`python -m backfill.testing.upstream`), an OpenAI-compatible server that answers with synthetic text: what is
real here is the whole batch pipeline (upload, validation, leasing, retries, group commit, finalize) driven by
the official openai SDK.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
from openai import OpenAI
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
OUT = Path.cwd() / "demo-output"
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            sys.exit(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    sys.exit(f"{url} did not come up")


@contextlib.contextmanager
def running(args: list[str], ready_url: str, log: Path) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    with open(log, "wb") as fh:
        process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(ready_url, process)
        yield
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="backfill-demo-"))
    upstream_port, port = free_port(), free_port()
    config = work / "backfill.toml"
    config.write_text(
        f'[[backends]]\nname = "demo-upstream"\nurl = "http://127.0.0.1:{upstream_port}"\n'
        'models = ["smollm2-135m-instruct"]\nmax_concurrency = 16\n'
    )
    upstream = [sys.executable, "-m", "backfill.testing.upstream", "--port", str(upstream_port), "--delay-ms", "20"]
    serve = [sys.executable, "-m", "backfill", "serve", "--port", str(port), "--data-dir", str(work / "data"),
             "--config", str(config)]  # fmt: skip
    console.print(f"[bold]backfill demo[/] — data in {work}")
    with (
        running(upstream, f"http://127.0.0.1:{upstream_port}/_stats?log=0", work / "upstream.log"),
        running(serve, f"http://127.0.0.1:{port}/healthz", work / "serve.log"),
    ):
        console.print(f"backfill serve is up on http://127.0.0.1:{port} (backend: built-in test upstream)")
        run_batch(OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo"))


def run_batch(client: OpenAI) -> None:
    uploaded = client.files.create(file=open(HERE / "reviews.jsonl", "rb"), purpose="batch")  # noqa: SIM115
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"demo": "1"}
    )
    console.print(f"uploaded {uploaded.filename} as {uploaded.id}; created {batch.id}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("validating", total=None)
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
            done = (counts.completed + counts.failed) if counts else 0
            progress.update(task, description=batch.status, total=counts.total if counts else None, completed=done)
    console.print(f"batch {batch.id}: [bold]{batch.status}[/] {batch.request_counts}")
    if batch.output_file_id is None:
        sys.exit(f"no output: {batch.errors}")
    OUT.mkdir(exist_ok=True)
    output = client.files.content(batch.output_file_id).read()
    (OUT / "output.jsonl").write_bytes(output)
    if batch.error_file_id:
        (OUT / "errors.jsonl").write_bytes(client.files.content(batch.error_file_id).read())
    for line in output.splitlines()[:5]:
        result = orjson.loads(line)
        reply = result["response"]["body"]["choices"][0]["message"]["content"]
        console.print(f"  {result['custom_id']}: {reply!r}")
    console.print(f"results in {OUT / 'output.jsonl'}; usage {batch.usage}")


if __name__ == "__main__":
    main()
