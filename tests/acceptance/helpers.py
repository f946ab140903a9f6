"""Small helpers shared by the acceptance tests: build JSONL input, upload it, poll a batch, read output files."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any, Protocol

import openai
import orjson
from openai import OpenAI
from openai.types import Batch

from tests.acceptance.conftest import MODEL, client_for
from tests.support.processes import Server

TERMINAL = {"completed", "failed", "expired", "cancelled"}

# SPEC §3: every key of the batch object, always sent.
BATCH_KEYS = {
    "id", "object", "endpoint", "input_file_id", "completion_window", "metadata", "model", "status", "errors",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage",
    "backfill",  # ours: the scheduler's outlook (SPEC keys above, unchanged)
}  # fmt: skip
BATCH_TIMES = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at",
)  # fmt: skip


class Clients:
    """The OpenAI clients one test opens, all closed when it ends (no socket is left to the garbage collector)."""

    def __init__(self) -> None:
        self._opened: list[OpenAI] = []

    def __call__(self, server: Server, api_key: str = "open-mode") -> OpenAI:
        client = client_for(server, api_key)
        self._opened.append(client)
        return client

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for client in self._opened:
            client.close()


def chat_line(custom_id: str, text: str, model: str = MODEL) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }


def jsonl(lines: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def upload(client: OpenAI, lines: list[dict[str, object]], filename: str = "in.jsonl", purpose: str = "batch") -> str:
    """Upload `lines` as a JSONL file; its id."""
    return client.files.create(file=(filename, io.BytesIO(jsonl(lines))), purpose=purpose).id  # type: ignore[arg-type]


def start_batch(
    client: OpenAI, lines: list[dict[str, object]], window: str = "24h", metadata: dict[str, str] | None = None
) -> Batch:
    """Upload `lines` and create a chat-completions batch over them."""
    return client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
        metadata=metadata,
    )


class RawResponse(Protocol):
    @property
    def content(self) -> bytes: ...


def body_of(response: RawResponse) -> Any:
    """The JSON body exactly as the server sent it (no SDK model in between)."""
    return orjson.loads(response.content)


def raw_batch(client: OpenAI, batch_id: str) -> dict[str, Any]:
    payload: dict[str, Any] = body_of(client.batches.with_raw_response.retrieve(batch_id))
    return payload


def wait_for(client: OpenAI, batch_id: str, done: Callable[[Batch], bool], timeout_s: float = 30) -> Batch:
    """Poll the batch until `done(batch)` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} did not reach the expected state within {timeout_s}s: {batch}")


def wait_terminal(client: OpenAI, batch_id: str, timeout_s: float = 60) -> Batch:
    return wait_for(client, batch_id, lambda batch: batch.status in TERMINAL, timeout_s)


def read_jsonl(client: OpenAI, file_id: str) -> list[dict[str, Any]]:
    """The parsed lines of a stored file (output or error file of a batch)."""
    return [orjson.loads(line) for line in client.files.content(file_id).text.splitlines()]


def counts(batch: Batch) -> tuple[int, int, int]:
    """(total, completed, failed) of a batch."""
    assert batch.request_counts is not None
    return batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of an error response's envelope."""
    error: dict[str, Any] = exc.response.json()["error"]
    return error
