"""The anthropic SDK's side of the message batch acceptance tests: clients, requests, polling, result access."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import anthropic
from anthropic import Anthropic
from anthropic.types import Message
from anthropic.types.messages import (
    MessageBatch,
    MessageBatchErroredResult,
    MessageBatchIndividualResponse,
    MessageBatchSucceededResult,
)
from anthropic.types.messages.batch_create_params import Request
from anthropic.types.shared import ErrorObject

from tests.acceptance.conftest import MODEL
from tests.support.processes import Server


class AnthropicClients:
    """The anthropic clients one test opens, all closed when it ends (no socket is left to the garbage collector)."""

    def __init__(self) -> None:
        self._opened: list[Anthropic] = []

    def __call__(self, server: Server, api_key: str = "open-mode") -> Anthropic:
        client = Anthropic(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=60)
        self._opened.append(client)
        return client

    def __enter__(self) -> AnthropicClients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for client in self._opened:
            client.close()


def message(custom_id: str, text: str, **params: Any) -> Request:
    params = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}], **params}
    return cast(Request, {"custom_id": custom_id, "params": params})


def succeeded(response: MessageBatchIndividualResponse) -> Message:
    assert isinstance(response.result, MessageBatchSucceededResult), response
    return response.result.message


def errored(response: MessageBatchIndividualResponse) -> ErrorObject:
    assert isinstance(response.result, MessageBatchErroredResult), response
    return response.result.error.error


def error_body(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = exc.response.json()
    return body


def wait_for(client: Anthropic, batch_id: str, done: Callable[[MessageBatch], bool], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.05)
    raise TimeoutError(f"message batch {batch_id} did not get there within {timeout_s}s: {batch}")


def wait_ended(client: Anthropic, batch_id: str, timeout_s: float = 30) -> MessageBatch:
    batch: MessageBatch = wait_for(client, batch_id, lambda b: b.processing_status == "ended", timeout_s)
    return batch


def results_of(client: Anthropic, batch_id: str) -> list[MessageBatchIndividualResponse]:
    return list(client.messages.batches.results(batch_id))


def counts(batch: MessageBatch) -> tuple[int, int, int, int, int]:
    """(processing, succeeded, errored, canceled, expired)."""
    c = batch.request_counts
    return c.processing, c.succeeded, c.errored, c.canceled, c.expired


def raw(response: Any) -> dict[str, Any]:
    payload: dict[str, Any] = response.json()
    return payload
