"""Anthropic Message Batches API end to end (SPEC §4): the official anthropic SDK against a real `backfill serve`,
its requests run by the fake OpenAI upstream through the same store and dispatcher as OpenAI batches."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import anthropic
import httpx
import pytest
from anthropic.types import TextBlock
from anthropic.types.beta.messages.batch_create_params import Request as BetaRequest
from anthropic.types.messages.batch_create_params import Request

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.message_batch_client import (
    AnthropicClients,
    counts,
    error_body,
    errored,
    message,
    raw,
    results_of,
    succeeded,
    wait_ended,
)
from tests.support.processes import Server, Upstream

MAX_REQUESTS = 50
MAX_BODY_BYTES = 64 * 1024
BATCH_KEYS = {
    "id", "type", "processing_status", "request_counts", "created_at", "expires_at", "ended_at",
    "cancel_initiated_at", "archived_at", "results_url",
    "backfill",  # ours: the scheduler's outlook, as on a batch (SPEC keys above, unchanged)
}  # fmt: skip
RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


@pytest.fixture
def connect() -> Iterator[AnthropicClients]:
    with AnthropicClients() as clients:
        yield clients


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> Server:
    """A server in open mode, shared by the quick tests below; each leaves it as it found it. Every create body
    is translated in the worker process here (offload from 0 bytes), as maximal ones are; the other modules' small
    creates take the thread path."""
    return start_module_server(
        message_batch_max_requests=MAX_REQUESTS, message_batch_max_bytes=MAX_BODY_BYTES, message_batch_offload_bytes=0
    )


def reply_to(text: str) -> str:
    """What the fake upstream answers."""
    return f"This is a fake reply to {len(text.split())} words."


# --- the flow ---------------------------------------------------------------------------------------------------


def test_a_message_batch_runs_and_its_results_come_back_in_request_order(
    connect: AnthropicClients, server: Server
) -> None:
    client = connect(server)
    tag = uuid.uuid4().hex[:8]
    texts = [f"flow {tag} number {i}" + " word" * i for i in range(5)]
    requests = [message(f"req-{4 - i}", text, system="Be brief.") for i, text in enumerate(texts)]

    created = raw(client.messages.batches.with_raw_response.create(requests=requests))

    assert BATCH_KEYS == set(created)
    assert created["id"].startswith("msgbatch_")
    assert ("message_batch", "in_progress", None) == (
        created["type"],
        created["processing_status"],
        created["results_url"],
    )
    assert 5 == sum(created["request_counts"].values())
    created_at = datetime.strptime(created["created_at"], RFC3339).replace(tzinfo=UTC)
    expires_at = datetime.strptime(created["expires_at"], RFC3339).replace(tzinfo=UTC)
    assert timedelta(hours=24) == expires_at - created_at
    ended = wait_ended(client, created["id"])
    assert (0, 5, 0, 0, 0) == counts(ended)
    assert ended.ended_at is not None
    assert ended.ended_at >= ended.created_at
    assert f"{server.base_url}/v1/messages/batches/{ended.id}/results" == ended.results_url
    results = results_of(client, ended.id)
    assert [f"req-{4 - i}" for i in range(5)] == [result.custom_id for result in results]
    for result, text in zip(results, texts, strict=True):
        reply = succeeded(result)
        assert (MODEL, "assistant", "end_turn", None) == (
            reply.model,
            reply.role,
            reply.stop_reason,
            reply.stop_sequence,
        )
        assert [TextBlock(type="text", text=reply_to(text), citations=None)] == reply.content
        # The fake upstream counts the words of every message, the system prompt's too, plus one.
        assert (len(text.split()) + 3, 8) == (reply.usage.input_tokens, reply.usage.output_tokens)
        assert reply.id.startswith("msg_")
    again = results_of(client, ended.id)
    assert [succeeded(r).id for r in results] == [succeeded(r).id for r in again]


def test_the_results_stream_is_jsonl_without_blank_lines(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)
    batch = client.messages.batches.create(requests=[message(f"r{i}", f"jsonl {i}") for i in range(3)])
    ended = wait_ended(client, batch.id)
    assert ended.results_url is not None

    body = httpx.get(ended.results_url, headers={"x-api-key": "k"}, timeout=30)

    assert 200 == body.status_code
    assert body.content.endswith(b"\n")
    assert 3 == len(body.content.split(b"\n")[:-1])
    assert all(line.startswith(b'{"custom_id":') for line in body.content.split(b"\n")[:-1])


def test_a_request_with_bad_params_ends_errored_and_the_others_still_run(
    connect: AnthropicClients, server: Server, upstream: Upstream
) -> None:
    client = connect(server)
    tag = uuid.uuid4().hex[:8]
    requests = [
        message("good-1", f"good one {tag}"),
        message("top-k", f"top k {tag}", top_k=5),  # the upstream is a plain OpenAI server: no top_k
        cast(
            Request, {"custom_id": "no-max", "params": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}}
        ),
        message("ghost", f"ghost {tag}", model="no-such-model"),
        message("refused", f"refused {tag} #bad400"),  # the backend answers 400
        message("good-2", f"good two {tag}"),
    ]

    batch = client.messages.batches.create(requests=requests)

    assert 6 == sum(counts(batch))
    assert 3 <= batch.request_counts.errored  # refused at once: they never wait for the backend
    ended = wait_ended(client, batch.id)
    assert (0, 2, 4, 0, 0) == counts(ended)
    results = {result.custom_id: result for result in results_of(client, batch.id)}
    assert ["good-1", "top-k", "no-max", "ghost", "refused", "good-2"] == list(results)
    assert ("succeeded", "succeeded") == (results["good-1"].result.type, results["good-2"].result.type)
    errors = {name: errored(results[name]) for name in ("top-k", "no-max", "ghost", "refused")}
    assert {"invalid_request_error"} == {error.type for error in errors.values()}
    assert (
        f"params.top_k: top_k is not supported by the backend that serves model '{MODEL}'." == errors["top-k"].message
    )
    assert "params.max_tokens: must be an integer of at least 1." == errors["no-max"].message
    assert "params.model: the model 'no-such-model' is not served" in errors["ghost"].message
    assert "The backend answered 400: Invalid parameter: messages" == errors["refused"].message
    sent = upstream.stats()["by_key"]
    assert 0 == sum(sent.get(key, 0) for key in (f"top k {tag}", f"ghost {tag}"))  # refused ones never ran


# --- envelope errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "message_part"),
    [
        ([message("same", "a"), message("same", "b")], "requests.1.custom_id: 'same' is used by more than one request"),
        ([message("not ok!", "a")], "requests.0.custom_id: must be 1 to 64 letters, digits, '_' or '-'"),
        ([message("x" * 65, "a")], "requests.0.custom_id"),
        ([], "requests: a message batch holds 1 to 50 requests, not 0."),
        ([message(f"r{i}", "a") for i in range(MAX_REQUESTS + 1)], "holds 1 to 50 requests, not 51."),
        ([{"custom_id": "a", "params": "nope"}], "requests.0.params: must be an object"),
    ],
)
def test_envelope_problems_are_400_with_the_anthropic_error_envelope(
    connect: AnthropicClients, server: Server, requests: list[Any], message_part: str
) -> None:
    client = connect(server)

    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.batches.create(requests=requests)

    body = error_body(refused.value)
    assert ("error", "invalid_request_error") == (body["type"], body["error"]["type"])
    assert message_part in body["error"]["message"]
    assert body["request_id"].startswith("req_")
    assert "false" == refused.value.response.headers["x-should-retry"]


def test_a_body_over_the_limit_is_413_request_too_large(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)
    big = "word " * (MAX_BODY_BYTES // 10)

    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.batches.create(requests=[message("a", big), message("b", big)])

    assert 413 == refused.value.status_code
    body = error_body(refused.value)
    assert ("error", "request_too_large") == (body["type"], body["error"]["type"])


def test_unknown_ids_are_404_not_found_error(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)

    for call in (
        client.messages.batches.retrieve,
        client.messages.batches.cancel,
        client.messages.batches.delete,
    ):
        with pytest.raises(anthropic.NotFoundError) as missing:
            call("msgbatch_nope")
        assert "not_found_error" == missing.value.response.json()["error"]["type"]
    unknown_route = httpx.get(f"{server.base_url}/v1/messages/batches/msgbatch_nope/what", timeout=10)
    assert (404, "error") == (unknown_route.status_code, unknown_route.json()["type"])


# --- list, delete, beta -------------------------------------------------------------------------------------------


def test_listing_pages_newest_first_in_both_directions(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)
    mine = [client.messages.batches.create(requests=[message("one", f"list {i}")]).id for i in range(5)]

    page = client.messages.batches.list(limit=2)
    listed = raw(client.messages.batches.with_raw_response.list(limit=2))
    older = [batch.id for batch in client.messages.batches.list(limit=2) if batch.id in mine]  # auto-pages after_id
    newer = [batch.id for batch in client.messages.batches.list(limit=2, before_id=mine[0])]  # auto-pages before_id

    assert {"data", "has_more", "first_id", "last_id"} == set(listed)
    assert (True, mine[-1], mine[-2]) == (listed["has_more"], listed["first_id"], listed["last_id"])
    assert [mine[-1], mine[-2]] == [batch.id for batch in page.data]
    assert mine[::-1] == older
    assert set(mine[1:]) == set(newer)
    assert 4 == len(newer)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(after_id="msgbatch_unknown")
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(limit=1001)


def test_a_batch_is_deleted_only_once_ended(connect: AnthropicClients, server: Server, upstream: Upstream) -> None:
    client = connect(server)
    tag = uuid.uuid4().hex
    slow = client.messages.batches.create(requests=[message("slow", f"slow {tag} #gate:{tag}")])

    with pytest.raises(anthropic.ConflictError) as refused:
        client.messages.batches.delete(slow.id)
    upstream.open_gate(tag)
    wait_ended(client, slow.id)
    deleted = client.messages.batches.delete(slow.id)

    assert "cannot be deleted while it is processing" in refused.value.response.json()["error"]["message"]
    assert (slow.id, "message_batch_deleted") == (deleted.id, deleted.type)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(slow.id)
    assert 404 == httpx.get(f"{server.base_url}/v1/messages/batches/{slow.id}/results", timeout=10).status_code
    assert slow.id not in [batch.id for batch in client.messages.batches.list(limit=100)]


def test_the_beta_client_path_works_the_same(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)

    batch = client.beta.messages.batches.create(requests=[cast(BetaRequest, message("beta", "beta path"))])
    ended = client.beta.messages.batches.retrieve(batch.id)
    while ended.processing_status != "ended":
        time.sleep(0.05)
        ended = client.beta.messages.batches.retrieve(batch.id)
    results = list(client.beta.messages.batches.results(batch.id))

    assert ["beta"] == [result.custom_id for result in results]
    assert "succeeded" == results[0].result.type
    assert batch.id in [b.id for b in client.beta.messages.batches.list(limit=5)]
    assert "message_batch_deleted" == client.beta.messages.batches.delete(batch.id).type


def test_message_batches_stay_out_of_the_openai_api(connect: AnthropicClients, server: Server) -> None:
    client = connect(server)
    batch = client.messages.batches.create(requests=[message("apart", "apart")])
    with client_for(server) as openai_client:
        with pytest.raises(Exception, match="404"):
            openai_client.batches.retrieve(batch.id)
        assert batch.id not in [b.id for b in openai_client.batches.list(limit=100)]
        assert "message_batch" not in {str(f.purpose) for f in openai_client.files.list()}


def test_results_url_points_wherever_the_proxy_says_clients_reach_the_server(
    connect: AnthropicClients, server: Server
) -> None:
    client = connect(server)
    batch = wait_ended(client, client.messages.batches.create(requests=[message("p", "proxy")]).id)

    behind = httpx.get(
        f"{server.base_url}/v1/messages/batches/{batch.id}",
        headers={"x-forwarded-proto": "https", "x-forwarded-host": "batch.example.com", "x-forwarded-prefix": "/bf"},
        timeout=10,
    ).json()

    assert f"https://batch.example.com/bf/v1/messages/batches/{batch.id}/results" == behind["results_url"]
