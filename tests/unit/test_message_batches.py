"""Message batches (SPEC §4): envelope checks, the plan, the MessageBatch object, result lines, results_url."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from starlette.requests import Request

from backfill.domain.batches import Batch, BatchApi, BatchStatus, RequestState
from backfill.domain.features import ALL_FEATURES, Feature
from backfill.domain.message_batches import (
    REFUSED,
    UnrunCounts,
    archive_at,
    message_batch_object,
    parse_requests,
    plan_requests,
    result_line,
)
from backfill.domain.results import StoredResult
from backfill.errors import InvalidRequest
from backfill.http.server_url import server_url

NOW = 1_764_000_000  # 2025-11-24T16:00:00Z


def request(custom_id: str = "r1", **params: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **params},
    }


def envelope_error(payload: Any, max_requests: int = 10) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_requests(payload, max_requests)
    return caught.value.message


# --- envelope -------------------------------------------------------------------------------------------------


def test_the_envelope_yields_each_custom_id_and_its_params() -> None:
    parsed = parse_requests({"requests": [request("a"), request("b-2_C")]}, 10)

    assert ["a", "b-2_C"] == [item.custom_id for item in parsed]
    assert "m" == parsed[0].params["model"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "The request body must be a JSON object."),
        ({}, "requests: a list of requests is required."),
        ({"requests": []}, "requests: a message batch holds 1 to 10 requests, not 0."),
        ({"requests": [request(str(i)) for i in range(11)]}, "holds 1 to 10 requests, not 11."),
        ({"requests": [request("has space")]}, "requests.0.custom_id: must be 1 to 64 letters"),
        ({"requests": [request("x" * 65)]}, "requests.0.custom_id: must be 1 to 64 letters"),
        ({"requests": [request("ok\n")]}, "requests.0.custom_id: must be 1 to 64 letters"),
        ({"requests": [request("a"), request("a")]}, "requests.1.custom_id: 'a' is used by more than one request"),
        ({"requests": [{"custom_id": "a", "params": "x"}]}, "requests.0.params: must be an object"),
        ({"requests": ["a"]}, "requests.0: must be an object"),
    ],
)
def test_envelope_problems_are_refused_synchronously(payload: Any, message: str) -> None:
    assert message in envelope_error(payload)


# --- plan -----------------------------------------------------------------------------------------------------


def plan(*requests: dict[str, Any], served: frozenset[str] = frozenset({"m", "n"})) -> Any:
    return plan_requests(parse_requests({"requests": list(requests)}, 100), served.__contains__, lambda _: ALL_FEATURES)


def test_runnable_requests_become_chat_completion_batch_lines() -> None:
    planned = plan(request("a")).requests[0]

    assert planned.line is not None
    assert {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    } == orjson.loads(planned.line)
    assert planned.refusal is None


def test_a_batch_runs_the_first_served_model_and_refuses_others_with_a_reason() -> None:
    result = plan(
        request("a", model="ghost"), request("b", model="n"), request("c", model="m"), request("d", model="n", top_p=3)
    )

    assert "n" == result.model
    ghost, runs, other, bad = result.requests
    assert "params.model: the model 'ghost' is not served by any backend of this server." == ghost.refusal
    assert (runs.line is not None, runs.refusal) == (True, None)
    assert "this batch runs 'n' (the first request's)" in (other.refusal or "")
    assert "params.top_p: must be a number between 0 and 1." == bad.refusal


def test_the_features_of_the_batch_model_decide_what_translates() -> None:
    result = plan_requests(
        parse_requests({"requests": [request("a", top_k=3)]}, 10), lambda _: True, lambda _: frozenset({Feature.TOOLS})
    )

    assert "params.top_k: top_k is not supported" in (result.requests[0].refusal or "")


# --- the MessageBatch object ----------------------------------------------------------------------------------


def batch(status: BatchStatus, **fields: Any) -> Batch:
    values: dict[str, Any] = {
        "id": "msgbatch_1",
        "tenant_id": "t",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "86400s",
        "status": status,
        "created_at": NOW,
        "expires_at": NOW + 86400,
        "api": BatchApi.ANTHROPIC,
        "total": 10,
    }
    values.update(fields)
    return Batch(**values)


def test_a_running_batch_counts_live_and_has_no_results_url() -> None:
    shown = message_batch_object(batch(BatchStatus.IN_PROGRESS, completed=3, failed=2), UnrunCounts(), "http://h")

    assert {
        "id": "msgbatch_1",
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": {"processing": 5, "succeeded": 3, "errored": 2, "canceled": 0, "expired": 0},
        "created_at": "2025-11-24T16:00:00Z",
        "expires_at": "2025-11-25T16:00:00Z",
        "ended_at": None,
        "cancel_initiated_at": None,
        "archived_at": None,
        "results_url": None,
        "backfill": {"estimated_completion_at": None, "schedule": None, "waiting": None},
    } == shown


def test_an_ended_batch_splits_its_failures_and_points_at_its_results() -> None:
    ended = batch(BatchStatus.CANCELLED, completed=4, failed=6, cancelling_at=NOW + 5, cancelled_at=NOW + 9)

    shown = message_batch_object(ended, UnrunCounts(expired=0, canceled=5), "https://api.example.com/bf")

    assert ("ended", "2025-11-24T16:00:09Z", "2025-11-24T16:00:05Z") == (
        shown["processing_status"], shown["ended_at"], shown["cancel_initiated_at"],
    )  # fmt: skip
    assert {"processing": 0, "succeeded": 4, "errored": 1, "canceled": 5, "expired": 0} == shown["request_counts"]
    assert "https://api.example.com/bf/v1/messages/batches/msgbatch_1/results" == shown["results_url"]


def test_a_cancelling_batch_is_canceling() -> None:
    shown = message_batch_object(batch(BatchStatus.CANCELLING, cancelling_at=NOW), UnrunCounts(), "http://h")

    assert "canceling" == shown["processing_status"]


def test_results_are_archived_retention_after_creation_once_ended() -> None:
    ended = batch(BatchStatus.COMPLETED, completed_at=NOW + 60)

    assert archive_at(ended, 100, NOW + 99) is None
    assert NOW + 100 == archive_at(ended, 100, NOW + 500)
    assert archive_at(batch(BatchStatus.IN_PROGRESS), 100, NOW + 500) is None
    assert archive_at(batch(BatchStatus.COMPLETED, archived_at=NOW + 100), 100, NOW + 900) is None


# --- result lines ---------------------------------------------------------------------------------------------

CHAT = {
    "choices": [{"message": {"content": "hi!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
}


def stored(state: RequestState, **fields: Any) -> StoredResult:
    values: dict[str, Any] = {
        "custom_id": "r1",
        "state": state,
        "result_id": "batch_req_abc",
        "status_code": None,
        "request_id": None,
        "body": None,
        "error_code": None,
        "error_message": None,
    }
    values.update(fields)
    return StoredResult(**values)


def line_of(result: StoredResult) -> Any:
    line = result_line(result, "m")
    assert line.endswith(b"\n")
    assert 1 == line.count(b"\n")
    return orjson.loads(line)


def test_a_success_is_a_succeeded_result_holding_a_message() -> None:
    line = line_of(stored(RequestState.SUCCEEDED, status_code=200, body=orjson.dumps(CHAT)))

    assert "r1" == line["custom_id"]
    assert ("succeeded", "msg_abc", "hi!") == (
        line["result"]["type"], line["result"]["message"]["id"], line["result"]["message"]["content"][0]["text"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("result", "error"),
    [
        (
            stored(RequestState.FAILED, error_code=REFUSED, error_message="params.top_k: no"),
            {"type": "invalid_request_error", "message": "params.top_k: no"},
        ),
        (
            stored(RequestState.FAILED, status_code=400, request_id="req_9",
                   body=b'{"error":{"message":"Only text content parts are supported.","type":"x"}}'),
            {"type": "invalid_request_error", "message": "The backend answered 400: Only text content parts are "
                                                         "supported."},
        ),
        (
            stored(RequestState.FAILED, status_code=529, body=b"{}"),
            {"type": "overloaded_error", "message": "The backend answered 529."},
        ),
        (
            stored(RequestState.FAILED, error_code="timeout", error_message="No answer within 30s."),
            {"type": "timeout_error", "message": "No answer within 30s."},
        ),
        (
            stored(RequestState.FAILED, error_code="backend_unavailable", error_message="Refused."),
            {"type": "api_error", "message": "Refused."},
        ),
        (
            stored(RequestState.SUCCEEDED, status_code=200, body=b'{"object":"chat.completion"}'),
            {"type": "api_error", "message": "The backend's answer holds no chat completion choice."},
        ),
    ],
)  # fmt: skip
def test_failures_are_errored_results_with_an_anthropic_error(result: StoredResult, error: dict[str, str]) -> None:
    line = line_of(result)

    assert "errored" == line["result"]["type"]
    assert ("error", error) == (line["result"]["error"]["type"], line["result"]["error"]["error"])


def test_lines_that_never_ran_are_expired_or_canceled() -> None:
    assert {"type": "expired"} == line_of(stored(RequestState.EXPIRED))["result"]
    assert {"type": "canceled"} == line_of(stored(RequestState.CANCELLED))["result"]


# --- results_url ----------------------------------------------------------------------------------------------


def http_request(headers: dict[str, str], root_path: str = "") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "server": ("10.0.0.5", 8080),
            "path": "/v1/messages/batches/x",
            "root_path": root_path,
            "query_string": b"",
            "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        }
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"host": "127.0.0.1:8080"}, "http://127.0.0.1:8080"),
        (
            {"host": "10.0.0.5:8080", "x-forwarded-proto": "https", "x-forwarded-host": "api.example.com"},
            "https://api.example.com",
        ),
        (
            {"host": "b", "x-forwarded-host": "proxy.example.com", "x-forwarded-port": "8443",
             "x-forwarded-proto": "https", "x-forwarded-prefix": "/batch/"},
            "https://proxy.example.com:8443/batch",
        ),
        ({"host": "b", "forwarded": 'for=1.2.3.4;host="edge.example.com";proto=https, for=5.6.7.8'},
         "https://edge.example.com"),
        ({"host": "b", "x-forwarded-host": "evil.com/phish?", "x-forwarded-proto": "gopher"}, "http://b"),
        ({"host": "[::1]:9000"}, "http://[::1]:9000"),
    ],
)  # fmt: skip
def test_results_url_base_follows_the_proxy_headers(headers: dict[str, str], expected: str) -> None:
    assert expected == server_url(http_request(headers), None)


def test_a_configured_public_url_wins() -> None:
    assert "https://batch.example.com" == server_url(
        http_request({"x-forwarded-host": "other"}), "https://batch.example.com"
    )
