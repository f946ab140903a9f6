import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backfill.testing.upstream import FakeUpstream, create_upstream_app, read_script


@pytest.fixture
def app() -> FakeUpstream:
    return create_upstream_app()


@pytest.fixture
async def client(app: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        yield client


def chat(text: str, model: str = "m") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
    }


async def test_chat_completion_is_answered_with_usage_and_request_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("say hello to me"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["role"] == "assistant"
    reply_words = len(body["choices"][0]["message"]["content"].split())
    # "be brief" + "say hello to me" + 1
    assert {"prompt_tokens": 7, "completion_tokens": reply_words, "total_tokens": 7 + reply_words} == body["usage"]


async def test_chat_key_is_the_text_parts_of_the_last_message(app: FakeUpstream, client: httpx.AsyncClient) -> None:
    content = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"text": "this"},
    ]
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "first"}, {"role": "user", "content": content}],
    }

    await client.post("/v1/chat/completions", json=body)

    assert app.stats()["by_key"] == {"look at this": 1}


async def test_completion_answers_text_completion(app: FakeUpstream, client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "m", "prompt": "once upon a time"})

    body = response.json()
    assert body["object"] == "text_completion"
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["prompt_tokens"] == 5
    assert app.stats()["by_key"] == {"once upon a time": 1}


async def test_embeddings_answer_one_vector_per_input(app: FakeUpstream, client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "e", "input": ["one two", "three"]})

    body = response.json()
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" and len(item["embedding"]) == 8 for item in body["data"])
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert app.stats()["by_key"] == {"one two": 1}


async def test_embeddings_take_the_dimensions_asked_for(client: httpx.AsyncClient) -> None:
    eight = (await client.post("/v1/embeddings", json={"model": "e", "input": "same"})).json()["data"][0]["embedding"]
    response = await client.post("/v1/embeddings", json={"model": "e", "input": ["same", "x"], "dimensions": 768})

    vectors = [entry["embedding"] for entry in response.json()["data"]]
    assert [len(vector) for vector in vectors] == [768, 768]
    assert vectors[0][:8] == eight  # the same input's vector, longer
    assert all(-1.0 <= value <= 1.0 for value in vectors[0])


async def test_embeddings_are_deterministic(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/embeddings", json={"model": "e", "input": "same"})
    second = await client.post("/v1/embeddings", json={"model": "e", "input": "same"})

    assert first.json()["data"] == second.json()["data"]


async def test_responses_answer_a_response_object_with_usage_details(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/responses", json={"model": "m", "input": "hi there"})

    body = response.json()
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["type"] == "output_text"
    usage = body["usage"]
    assert usage["input_tokens"] == 3
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}


async def test_moderations_answer_unflagged_results(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/moderations", json={"input": ["a", "b"]})

    body = response.json()
    assert body["id"].startswith("modr-")
    assert [result["flagged"] for result in body["results"]] == [False, False]


async def test_fail429_fails_the_first_n_with_retry_after(app: FakeUpstream, client: httpx.AsyncClient) -> None:
    body = chat("review 17 #fail429:2:0.5")

    responses = [await client.post("/v1/chat/completions", json=body) for _ in range(3)]

    assert [r.status_code for r in responses] == [429, 429, 200]
    assert responses[0].headers["retry-after"] == "0.5"
    error = {
        "message": "Rate limit reached",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert {"error": error} == responses[0].json()
    assert app.stats()["by_status"] == {"429": 2, "200": 1}


async def test_failure_counts_are_per_exact_key(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/chat/completions", json=chat("a #fail429:1:1"))
    other = await client.post("/v1/chat/completions", json=chat("b #fail429:1:1"))

    assert [first.status_code, other.status_code] == [429, 429]


async def test_fail500_fails_the_first_n(client: httpx.AsyncClient) -> None:
    responses = [await client.post("/v1/chat/completions", json=chat("x #fail500:1")) for _ in range(2)]

    assert [r.status_code for r in responses] == [500, 200]
    assert responses[0].json()["error"]["type"] == "server_error"


async def test_fail500_always_never_succeeds(client: httpx.AsyncClient) -> None:
    responses = [await client.post("/v1/embeddings", json={"input": "x #fail500:always"}) for _ in range(4)]

    assert [r.status_code for r in responses] == [500] * 4


async def test_bad400_answers_invalid_request(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("#bad400"))

    assert response.status_code == 400
    error = {
        "message": "Invalid parameter: messages",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }
    assert {"error": error} == response.json()


async def test_garbage_answers_200_with_a_body_that_is_not_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("tell me #garbage"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == b"this is not json"


@pytest.mark.parametrize("directive", ["#hang:0.2", "#slow:200"])
async def test_hang_and_slow_wait_before_answering(client: httpx.AsyncClient, directive: str) -> None:
    started = time.monotonic()
    response = await client.post("/v1/chat/completions", json=chat(f"wait {directive}"))

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_delay_applies_to_every_successful_answer() -> None:
    transport = httpx.ASGITransport(app=create_upstream_app(delay_s=0.1))
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        started = time.monotonic()
        await client.post("/v1/chat/completions", json=chat("plain"))

        assert time.monotonic() - started >= 0.1


async def test_hash_words_that_are_not_directives_are_plain_text(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("fix issue #12 and #fail"))

    assert response.status_code == 200


async def test_malformed_directive_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("#fail429:two:1"))

    assert response.status_code == 400
    assert "Malformed test directive" in response.json()["error"]["message"]


async def test_body_that_is_not_json_gets_400(app: FakeUpstream, client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b"{not json")

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert app.stats()["by_status"] == {"400": 1}


async def test_unknown_route_gets_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/chat/completions")

    assert response.status_code == 404


async def test_stats_count_requests_by_key_and_status_and_log_them(client: httpx.AsyncClient) -> None:
    before = time.time()
    await client.post("/v1/chat/completions", json=chat("a"))
    await client.post("/v1/chat/completions", json=chat("a"))
    await client.post("/v1/embeddings", json={"input": "b #bad400"})

    stats = (await client.get("/_stats")).json()

    assert stats["total"] == 3
    assert stats["by_key"] == {"a": 2, "b #bad400": 1}
    assert stats["by_status"] == {"200": 2, "400": 1}
    assert [(entry["path"], entry["key"], entry["status"]) for entry in stats["log"]] == [
        ("/v1/chat/completions", "a", 200),
        ("/v1/chat/completions", "a", 200),
        ("/v1/embeddings", "b #bad400", 400),
    ]
    assert all(before <= entry["t"] <= time.time() for entry in stats["log"])


async def test_reset_clears_counters_and_failure_counts(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("k #fail429:1:1"))

    reset = await client.post("/_reset")
    again = await client.post("/v1/chat/completions", json=chat("k #fail429:1:1"))

    assert reset.status_code == 200
    assert again.status_code == 429
    stats = (await client.get("/_stats")).json()
    assert stats == {
        "total": 1,
        "by_key": {"k #fail429:1:1": 1},
        "by_status": {"429": 1},
        "log": stats["log"],
    }
    assert [entry["status"] for entry in stats["log"]] == [429]


def test_directives_combine_failures_first_then_waits() -> None:
    key = "x #fail500:1 #slow:100 #hang:1"

    assert (read_script(key, 1).status, read_script(key, 1).sleep_s) == (500, 0.0)
    assert (read_script(key, 2).status, read_script(key, 2).sleep_s) == (200, 1.1)


async def test_stats_can_leave_out_the_log(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("a"))

    stats = (await client.get("/_stats", params={"log": "0"})).json()

    assert stats == {"total": 1, "by_key": {"a": 1}, "by_status": {"200": 1}}


async def test_a_gated_request_waits_until_its_gate_opens(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(client.post("/v1/chat/completions", json=chat("held #gate:g1")))
    for _ in range(10_000):  # each round lets the held request move on, until it waits at its gate
        await asyncio.sleep(0)
        if (await client.get("/_gates/g1")).json()["waiting"] == 1:
            break

    assert not waiting.done()
    assert {"waiting": 1, "open": True} == (await client.post("/_gates/g1")).json()
    assert 200 == (await waiting).status_code
    assert {"waiting": 0, "open": True} == (await client.get("/_gates/g1")).json()
    # An open gate stays open for those that come later.
    assert 200 == (await client.post("/v1/chat/completions", json=chat("later #gate:g1"))).status_code
