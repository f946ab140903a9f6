"""The result cache's rules: which lines may be answered from it, the key their answers are kept under, and what a
model's identity is made of."""

from __future__ import annotations

import pytest

from backfill.domain.result_cache import cache_key, is_deterministic, metadata_error, metadata_flag, model_identity

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, {"model": "m", "messages": MESSAGES, "temperature": 0}),
        (CHAT, {"model": "m", "messages": MESSAGES, "temperature": 0.0}),
        (CHAT, {"model": "m", "messages": MESSAGES, "temperature": 0.7, "seed": 42}),
        ("/v1/completions", {"model": "m", "prompt": "x", "seed": 0}),
        ("/v1/responses", {"model": "m", "input": "x", "temperature": 0}),
        ("/v1/embeddings", {"model": "e", "input": "x"}),
        ("/v1/moderations", {"model": "e", "input": "x"}),
    ],
)
def test_requests_that_get_the_same_answer_again_are_deterministic(endpoint: str, body: dict[str, object]) -> None:
    assert is_deterministic(endpoint, body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": MESSAGES},  # the default temperature is 1
        {"model": "m", "messages": MESSAGES, "temperature": 0.2},
        {"model": "m", "messages": MESSAGES, "temperature": False},
        {"model": "m", "messages": MESSAGES, "seed": "42"},
        {"model": "m", "messages": MESSAGES, "seed": True},
        {"model": "m", "messages": MESSAGES, "temperature": 0, "stream": True},
    ],
)
def test_sampled_requests_are_not(body: dict[str, object]) -> None:
    assert not is_deterministic(CHAT, body)


def test_the_key_does_not_depend_on_the_order_of_keys() -> None:
    one = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 5}
    other = {"max_tokens": 5, "temperature": 0, "messages": MESSAGES, "model": "m"}

    assert cache_key(CHAT, "m", "id1", one) == cache_key(CHAT, "m", "id1", other)


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "/v1/completions"},
        {"model": "m2"},
        {"identity": "id2"},
        {"body": {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 6}},
    ],
)
def test_any_change_of_endpoint_model_identity_or_body_changes_the_key(change: dict[str, object]) -> None:
    base: dict[str, object] = {
        "endpoint": CHAT,
        "model": "m",
        "identity": "id1",
        "body": {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 5},
    }
    changed = base | change

    assert cache_key(**base) != cache_key(**changed)  # type: ignore[arg-type]


def test_a_sampled_request_has_no_key() -> None:
    assert cache_key(CHAT, "m", "id1", {"model": "m", "messages": MESSAGES}) is None


def test_identity_ignores_the_start_time_and_vllms_permission_ids() -> None:
    first = {"id": "m", "root": "/w/llama", "created": 1, "permission": [{"id": "modelperm-a"}]}
    restarted = {"id": "m", "root": "/w/llama", "created": 2, "permission": [{"id": "modelperm-b"}]}

    assert model_identity(first, flavour="vllm", revision=None) == model_identity(
        restarted, flavour="vllm", revision=None
    )


@pytest.mark.parametrize(
    "other",
    [
        ({"id": "m", "root": "/w/llama-v2"}, "vllm", None),
        ({"id": "m", "root": "/w/llama"}, "sglang", None),
        ({"id": "m", "root": "/w/llama"}, "vllm", "sha-2"),
    ],
)
def test_other_weights_engine_or_revision_is_another_identity(other: tuple[dict[str, str], str, str | None]) -> None:
    described, flavour, revision = other
    base = model_identity({"id": "m", "root": "/w/llama"}, flavour="vllm", revision=None)

    assert model_identity(described, flavour=flavour, revision=revision) != base


def test_a_model_nothing_is_known_of_has_no_identity() -> None:
    assert model_identity(None, flavour="openai", revision=None) is None


def test_a_revision_alone_is_an_identity() -> None:
    assert model_identity(None, flavour="openai", revision="v3") is not None


@pytest.mark.parametrize(
    ("metadata", "flag"),
    [
        (None, None),
        ({}, None),
        ({"team": "x"}, None),
        ({"backfill_result_cache": "true"}, True),
        ({"backfill_result_cache": "FALSE"}, False),
    ],
)
def test_a_batch_says_whether_it_wants_the_cache_in_its_metadata(
    metadata: dict[str, str] | None, flag: bool | None
) -> None:
    assert metadata_flag(metadata) is flag


def test_an_unreadable_metadata_value_is_refused() -> None:
    assert metadata_error({"backfill_result_cache": "yes"}) == (
        "Invalid 'metadata.backfill_result_cache': expected \"true\" or \"false\", but got 'yes' instead."
    )
