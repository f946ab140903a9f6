"""Output and error file lines (SPEC §3)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from backfill.domain.batches import RequestState
from backfill.domain.results import CANCELLED_MESSAGE, EXPIRED_MESSAGE, StoredResult, output_line

CHAT_BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":3}}'
ERROR_BODY = b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'


def stored(state: RequestState, **fields: Any) -> StoredResult:
    values: dict[str, Any] = {
        "custom_id": "request-1",
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


def parse(line: bytes) -> Any:
    assert line.endswith(b"\n")
    assert 1 == line.count(b"\n")
    return orjson.loads(line)


def test_success_line_embeds_the_response_body_as_an_object() -> None:
    result = stored(RequestState.SUCCEEDED, status_code=200, request_id="req_1", body=CHAT_BODY)

    actual = parse(output_line(result, "batch_req_fallback"))

    expected = {
        "id": "batch_req_abc",
        "custom_id": "request-1",
        "response": {"status_code": 200, "request_id": "req_1", "body": orjson.loads(CHAT_BODY)},
        "error": None,
    }
    assert expected == actual
    assert isinstance(actual["response"]["body"], dict)
    assert result.is_success


def test_http_error_line_keeps_the_response_and_has_no_error() -> None:
    result = stored(RequestState.FAILED, status_code=500, request_id="req_2", body=ERROR_BODY)

    actual = parse(output_line(result, "batch_req_fallback"))

    expected = {
        "id": "batch_req_abc",
        "custom_id": "request-1",
        "response": {"status_code": 500, "request_id": "req_2", "body": orjson.loads(ERROR_BODY)},
        "error": None,
    }
    assert expected == actual
    assert not result.is_success


def test_failure_without_response_has_a_null_response_and_the_error() -> None:
    result = stored(RequestState.FAILED, error_code="timeout", error_message="no answer within 5s")

    actual = parse(output_line(result, "batch_req_fallback"))

    expected = {
        "id": "batch_req_abc",
        "custom_id": "request-1",
        "response": None,
        "error": {"code": "timeout", "message": "no answer within 5s"},
    }
    assert expected == actual


def test_failure_without_a_code_is_backend_unavailable() -> None:
    actual = parse(output_line(stored(RequestState.FAILED), "x"))

    assert "backend_unavailable" == actual["error"]["code"]
    assert isinstance(actual["error"]["message"], str)


@pytest.mark.parametrize(
    ("state", "code", "message"),
    [
        (RequestState.EXPIRED, "batch_expired", EXPIRED_MESSAGE),
        (RequestState.CANCELLED, "batch_cancelled", CANCELLED_MESSAGE),
    ],
)
def test_lines_that_never_ran_carry_the_reason(state: RequestState, code: str, message: str) -> None:
    actual = parse(output_line(stored(state, result_id=None), "batch_req_fallback"))

    expected = {
        "id": "batch_req_fallback",
        "custom_id": "request-1",
        "response": None,
        "error": {"code": code, "message": message},
    }
    assert expected == actual


def test_expired_message_is_the_spec_wording() -> None:
    assert "This request could not be executed before the completion window expired." == EXPIRED_MESSAGE


def test_custom_id_with_quotes_and_newlines_stays_on_one_line() -> None:
    result = stored(RequestState.SUCCEEDED, custom_id='a "b"\nc', status_code=200, body=b"{}")

    assert 'a "b"\nc' == parse(output_line(result, "x"))["custom_id"]
