"""The SPEC §6 flow, end to end, with the official openai SDK against a real `backfill serve`."""

from __future__ import annotations

import io

import orjson

from tests.acceptance.conftest import StartServer, client_for
from tests.acceptance.helpers import chat_line, jsonl, wait_terminal


def test_a_batch_runs_end_to_end_with_the_openai_sdk(start_server: StartServer) -> None:
    server = start_server()
    client = client_for(server)
    lines = [chat_line(f"req-{i}", f"smoke line {i}") for i in range(50)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "x"}
    )
    assert "validating" == batch.status

    done = wait_terminal(client, batch.id)

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
