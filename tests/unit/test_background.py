"""Background and flex calls: how a request becomes its one line, and how the line reads back as a Response."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response

from backfill.domain import background
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.results import StoredResult
from backfill.domain.usage_report import (
    Price,
    UsageCounts,
    UsageKey,
    UsageKind,
    Window,
    cost_buckets,
    kind_of_api,
    usage_buckets,
)
from backfill.errors import InvalidRequest

ENGINE_BODY = orjson.dumps(
    {
        "id": "resp_engine",
        "object": "response",
        "created_at": 5,
        "status": "completed",
        "model": "m",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
    }
)


def line(state: RequestState, body: bytes | None = None, **rest: Any) -> StoredResult:
    fields: dict[str, Any] = {"status_code": None, "error_code": None, "error_message": None} | rest
    return StoredResult("response", state, None, request_id=None, body=body, **fields)


def shown(state: RequestState, body: bytes | None = None, batch: BatchStatus = BatchStatus.IN_PROGRESS) -> Response:
    echo = background.echo_of({"service_tier": "flex", "temperature": 0.2})
    return Response.model_validate(background.response_object("resp_1", 7, "m", batch, line(state, body), echo))


@pytest.mark.parametrize(
    ("state", "batch", "expected"),
    [
        (RequestState.QUEUED, BatchStatus.IN_PROGRESS, "queued"),
        (RequestState.LEASED, BatchStatus.IN_PROGRESS, "in_progress"),
        (RequestState.QUEUED, BatchStatus.CANCELLING, "cancelled"),
        (RequestState.CANCELLED, BatchStatus.CANCELLED, "cancelled"),
        (RequestState.SUCCEEDED, BatchStatus.CANCELLED, "cancelled"),  # answered in the cancel's grace: cancelled
        (RequestState.FAILED, BatchStatus.COMPLETED, "failed"),
        (RequestState.EXPIRED, BatchStatus.EXPIRED, "failed"),
    ],
)
def test_the_line_state_reads_as_the_response_status(state: RequestState, batch: BatchStatus, expected: str) -> None:
    assert expected == shown(state, batch=batch).status


def test_a_finished_response_is_the_engines_with_our_id_and_tier() -> None:
    response = shown(RequestState.SUCCEEDED, ENGINE_BODY, BatchStatus.COMPLETED)

    assert ("resp_1", "completed", "Hi") == (response.id, response.status, response.output_text)
    assert ("flex", True, 0.2) == (response.service_tier, response.background, response.temperature)


def test_a_queued_response_validates_with_no_output() -> None:
    response = shown(RequestState.QUEUED)

    assert ([], 7, "m") == (response.output, response.created_at, response.model)


def test_a_failed_response_says_the_engines_message() -> None:
    refusal = orjson.dumps({"error": {"message": "context too long", "type": "invalid_request_error"}})
    echo = background.echo_of({})

    response = background.response_object(
        "resp_1", 7, "m", BatchStatus.COMPLETED, line(RequestState.FAILED, refusal, status_code=400), echo
    )

    assert {"code": "server_error", "message": "context too long"} == response["error"]


def test_the_input_line_leaves_out_what_is_backfills_to_read() -> None:
    body = {"model": "m", "input": "x", "background": True, "service_tier": "flex"}

    parsed = orjson.loads(background.input_line("/v1/responses", body))

    assert {"model": "m", "input": "x"} == parsed["body"]
    assert ("/v1/responses", "response") == (parsed["url"], parsed["custom_id"])


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("/v1/responses", {"background": True}, (True, False)),
        ("/v1/responses", {"background": True, "service_tier": "flex"}, (True, True)),
        ("/v1/chat/completions", {"service_tier": "flex"}, (False, True)),
        ("/v1/chat/completions", {"background": True}, (False, False)),
        ("/v1/embeddings", {"service_tier": "flex"}, (False, False)),
        ("/v1/completions", {"service_tier": "auto"}, (False, False)),
    ],
)
def test_which_calls_are_deferred(endpoint: str, body: dict[str, Any], expected: tuple[bool, bool]) -> None:
    assert expected == background.is_deferred(endpoint, body)


def test_a_streamed_background_call_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        background.is_deferred("/v1/responses", {"background": True, "stream": True})

    assert "stream" == refused.value.param


def test_a_flex_answer_names_its_tier() -> None:
    answer = background.flex_answer(b'{"id": "chatcmpl-1", "service_tier": "default"}', "/v1/chat/completions", {})

    assert {"id": "chatcmpl-1", "service_tier": "flex"} == orjson.loads(answer)


@pytest.mark.parametrize(
    ("api", "expected"),
    [("openai", UsageKind.BATCH), ("gemini", UsageKind.BATCH), ("flex", UsageKind.FLEX),
     ("responses", UsageKind.BACKGROUND)],
)  # fmt: skip
def test_usage_kind_follows_the_api(api: str, expected: UsageKind) -> None:
    assert expected == kind_of_api(api)


def test_usage_groups_by_kind_and_prices_flex_at_the_batch_discount() -> None:
    rows = [
        (UsageKey("t", "m", 60, UsageKind.FLEX), UsageCounts(1, 10, 0, 10)),
        (UsageKey("t", "m", 60, UsageKind.INTERACTIVE), UsageCounts(1, 10, 0, 10)),
    ]
    window = Window(0, 3600, 3600, 1)

    results = usage_buckets(rows, window, ["kind"], {})[0].results
    costs = cost_buckets(rows, window, ["line_item"], {}, {"m": Price(1e6, 1e6)}, 0.5)[0].results

    assert {"flex": 1, "interactive": 1} == {r["kind"]: r["num_model_requests"] for r in results}
    assert {"m, input (batch)": 5.0, "m, output (batch)": 5.0, "m, input": 10.0, "m, output": 10.0} == {
        r["line_item"]: r["amount"]["value"] for r in costs
    }
