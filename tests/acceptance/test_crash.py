"""kill -9 of `backfill serve` mid-batch loses nothing and never re-sends a line whose result was committed."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import orjson

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.support.databases import fetch_rows
from tests.support.processes import Server, Upstream


def _line(i: int, tag: str) -> dict[str, object]:
    return {
        "custom_id": f"crash-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{tag} line {i} #slow:40"}]},
    }


def _committed_successes(server: Server, batch_id: str) -> set[str]:
    """custom_ids whose success is durably in the database, read behind the server's back."""
    query = "SELECT custom_id FROM requests WHERE batch_id = %s AND state = 'succeeded'"
    return {str(row[0]) for row in fetch_rows(server.database_url, query, (batch_id,))}


def test_kill_9_mid_batch_then_restart_finishes_every_line_exactly_once(
    start_server: StartServer, upstream: Upstream
) -> None:
    tag = f"crash-{time.time_ns()}"
    n = 400
    server = start_server(
        lease_ttl_s=2.0,
        backends=[{"name": "up", "url": upstream.url, "models": [MODEL], "max_concurrency": 8}],
    )
    client = client_for(server)
    data = b"".join(orjson.dumps(_line(i, tag)) + b"\n" for i in range(n))
    uploaded = client.files.create(file=("crash.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < n // 4:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)

    server.kill9()
    killed_at = time.time()
    committed = _committed_successes(server, batch.id)
    assert n // 4 <= len(committed) < n

    server.start()
    deadline = time.monotonic() + 120
    while (done := client.batches.retrieve(batch.id)).status != "completed":
        assert done.status not in ("failed", "expired", "cancelled"), done.status
        assert time.monotonic() < deadline, f"not completed after restart: {done.status} {done.request_counts}"
        time.sleep(0.1)

    assert done.request_counts is not None
    assert (n, n, 0) == (done.request_counts.total, done.request_counts.completed, done.request_counts.failed)
    assert done.error_file_id is None
    assert done.output_file_id is not None
    output = [orjson.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [f"crash-{i}" for i in range(n)] == [line["custom_id"] for line in output]

    resent = {
        entry["key"] for entry in upstream.stats()["log"] if entry["key"].startswith(tag) and entry["t"] > killed_at
    }
    committed_keys = {f"{tag} line {cid.removeprefix('crash-')} #slow:40" for cid in committed}
    assert set() == resent & committed_keys
    assert resent, "some lines were in flight or queued at the kill and must have run after the restart"
    assert _file_usage(output) == _reported_usage(server, int(killed_at) - 3600)


def _file_usage(output: list[dict[str, Any]]) -> tuple[int, int, int]:
    usages = [line["response"]["body"]["usage"] for line in output]
    return (len(usages), sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages))


def _reported_usage(server: Server, since: int) -> tuple[int, int, int]:
    """(requests, input, output) of batch lines in the usage API: written with the lines, so never counted twice."""
    params = {"start_time": since, "bucket_width": "1h", "batch": "true"}
    page = httpx.get(f"{server.base_url}/v1/organization/usage/completions", params=params, timeout=30).json()
    results = [result for bucket in page["data"] for result in bucket["results"]]
    return (
        sum(r["num_model_requests"] for r in results),
        sum(r["input_tokens"] for r in results),
        sum(r["output_tokens"] for r in results),
    )
