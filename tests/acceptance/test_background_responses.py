"""Background Responses calls and flex calls on a real `backfill serve`, driven by the openai SDK (issue 21)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.helpers import error_of
from tests.support.processes import Server, Upstream, free_port


@pytest.fixture(scope="module")
def served(start_module_server: StartServer) -> tuple[Server, str]:
    server = start_module_server()
    return server, server.create_key("flexy")


@pytest.fixture
def client(served: tuple[Server, str]) -> OpenAI:
    server, key = served
    return client_for(server, key)


def wait_response(
    client: OpenAI, response_id: str, done: Callable[[Response], bool], timeout_s: float = 30
) -> Response:
    deadline = time.monotonic() + timeout_s
    response = client.responses.retrieve(response_id)
    while not done(response) and time.monotonic() < deadline:
        time.sleep(0.05)
        response = client.responses.retrieve(response_id)
    return response


def open_gate(upstream_url: str, name: str) -> None:
    httpx.post(f"{upstream_url}/_gates/{name}", timeout=10).raise_for_status()


def waiting_at(upstream_url: str, name: str) -> int:
    waiting: int = httpx.get(f"{upstream_url}/_gates/{name}", timeout=10).json()["waiting"]
    return waiting


def test_a_background_response_is_queued_then_completed(client: OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="hello there", background=True)

    done = wait_response(client, created.id, lambda r: r.status not in ("queued", "in_progress"))

    assert (True, created.id) == (created.id.startswith("resp_"), done.id)
    assert created.status in ("queued", "in_progress")
    assert ("completed", True) == (done.status, done.background)
    assert done.output_text


def test_a_flex_background_response_echoes_its_tier(client: OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="flex it", background=True, service_tier="flex")

    done = wait_response(client, created.id, lambda r: r.status == "completed")

    assert ("flex", "completed") == (done.service_tier, done.status)


def test_a_background_response_in_flight_can_be_cancelled(client: OpenAI, upstream: Upstream) -> None:
    gate = f"bg{uuid.uuid4().hex}"
    created = client.responses.create(model=MODEL, input=f"hold #gate:{gate}", background=True)
    deadline = time.monotonic() + 30
    while waiting_at(upstream.url, gate) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "in_progress" == client.responses.retrieve(created.id).status

    cancelled = client.responses.cancel(created.id)
    open_gate(upstream.url, gate)

    assert "cancelled" == cancelled.status
    assert "cancelled" == wait_response(client, created.id, lambda r: r.status != "in_progress").status


def test_cancelling_a_finished_response_is_a_400(client: OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="quick", background=True)
    wait_response(client, created.id, lambda r: r.status == "completed")

    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(created.id)

    assert "Cannot cancel a response with status 'completed'." == error_of(refused.value)["message"]


def test_another_tenants_response_is_a_404(served: tuple[Server, str], client: OpenAI) -> None:
    server, _ = served
    created = client.responses.create(model=MODEL, input="mine", background=True)
    theirs = client_for(server, server.create_key("other-tenant"))

    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.cancel(created.id)


def test_background_with_stream_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="x", background=True, stream=True)

    assert "stream" == error_of(refused.value)["param"]


def test_a_flex_chat_call_is_answered_by_the_engine(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "flex chat"}], service_tier="flex"
    )

    assert ("flex", True) == (answer.service_tier, bool(answer.choices[0].message.content))


def test_a_flex_response_call_is_answered_by_the_engine(client: OpenAI) -> None:
    answer = client.responses.create(model=MODEL, input="flex response", service_tier="flex")

    assert ("completed", "flex") == (answer.status, answer.service_tier)


def test_flex_and_background_show_as_their_own_usage_kinds(served: tuple[Server, str]) -> None:
    server, _ = served
    key = server.create_key("usage-kinds")
    client = client_for(server, key)
    started = int(time.time())
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count me"}], service_tier="flex")
    created = client.responses.create(model=MODEL, input="count me too", background=True)
    wait_response(client, created.id, lambda r: r.status == "completed")

    page = httpx.get(
        f"{server.base_url}/v1/organization/usage/completions",
        params={"start_time": started - 60, "bucket_width": "1h", "group_by": "kind"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).json()

    kinds = {r["kind"]: r["num_model_requests"] for bucket in page["data"] for r in bucket["results"]}
    assert {"flex": 1, "background": 1} == kinds


def test_a_flex_call_with_no_capacity_is_a_429_resource_unavailable(start_server: StartServer) -> None:
    dead = [{"name": "down", "url": f"http://127.0.0.1:{free_port()}", "models": [MODEL], "max_concurrency": 4}]
    server = start_server(backends=dead, flex_timeout_s=1.0, request_timeout_s=2.0)
    client = client_for(server)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], service_tier="flex")

    assert "resource_unavailable" == error_of(refused.value)["code"]
