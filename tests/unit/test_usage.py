"""Token usage read from each endpoint's response shape and summed per batch."""

from __future__ import annotations

from typing import Any

import pytest

from backfill.domain.usage import Usage


def test_chat_completion_usage_with_details() -> None:
    body = {
        "object": "chat.completion",
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 12},
        },
    }

    assert Usage(120, 64, 30, 12) == Usage.from_response(body)


def test_chat_completion_usage_without_details() -> None:
    body = {"usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}

    assert Usage(7, 0, 5, 0) == Usage.from_response(body)


def test_embeddings_usage_has_only_input_tokens() -> None:
    body = {"object": "list", "data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}

    assert Usage(9, 0, 0, 0) == Usage.from_response(body)


def test_responses_usage_with_details() -> None:
    body = {
        "object": "response",
        "usage": {
            "input_tokens": 40,
            "input_tokens_details": {"cached_tokens": 8},
            "output_tokens": 22,
            "output_tokens_details": {"reasoning_tokens": 6},
            "total_tokens": 62,
        },
    }

    assert Usage(40, 8, 22, 6) == Usage.from_response(body)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"usage": None},
        {"usage": "lots"},
        {"usage": {}},
        {"usage": {"prompt_tokens": -3, "completion_tokens": "5", "prompt_tokens_details": []}},
        {"usage": {"prompt_tokens": True, "completion_tokens": 2.5}},
    ],
    ids=["no-usage", "null", "string", "empty", "negative-and-strings", "bool-and-float"],
)
def test_missing_or_malformed_usage_counts_as_zero(body: dict[str, Any]) -> None:
    assert Usage() == Usage.from_response(body)


def test_usages_add_up_and_total_is_input_plus_output() -> None:
    total = Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40)

    assert Usage(11, 22, 33, 44) == total
    assert 44 == total.total_tokens


def test_usage_in_the_batch_object_shape() -> None:
    expected = {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 16,
    }

    assert expected == Usage(11, 2, 5, 1).to_openai()
