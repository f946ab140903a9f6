"""The SPEC §6 flow, end to end, with the official openai SDK against a real `backfill serve`."""

from __future__ import annotations

import io
import time

import orjson
from openai import OpenAI

from tests.acceptance.conftest import MODEL, StartServer, client_for

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, text: str, model: str = MODEL) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }


def jsonl(lines: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def wait_terminal(client: OpenAI, batch_id: str, timeout_s: float = 60) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} did not end within {timeout_s}s")


def test_a_batch_runs_end_to_end_with_the_openai_sdk(start_server: StartServer) -> None:
    server = start_server()
    client = client_for(server)
    lines = [chat_line(f"req-{i}", f"smoke line {i}") for i in range(50)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "x"}
    )
    assert "validating" == batch.status

    done = client.batches.retrieve(wait_terminal(client, batch.id).id)  # type: ignore[attr-defined]

    assert "completed" == done.status
    assert (50, 50, 0) == (done.request_counts.total, done.request_counts.completed, done.request_counts.failed)
    assert done.usage is not None
    assert done.usage.total_tokens > 0
    assert done.error_file_id is None
    assert done.output_file_id is not None
    output = [orjson.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [f"req-{i}" for i in range(50)] == [line["custom_id"] for line in output]
    assert all(200 == line["response"]["status_code"] for line in output)
    assert {"job": "x"} == done.metadata
