"""The interactive proxy inside the real app (SQLite, no dispatcher), its backends scripted: a handler on a loopback
socket for OpenAIHttpBackend (tests/support/handler_server.py), an in-process fake for the embedded kind."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from fastapi import FastAPI
from openai.types.responses import Response, ResponseCompletedEvent

from backfill.backends.openai_http import OpenAIHttpBackend
from backfill.config import BackendSettings, Settings
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.http.app import create_app
from backfill.ports import Backend
from backfill.services import Services
from tests.integration.test_store_workers import flying
from tests.support.handler_server import Handler, HandlerSlot, RawHandler, closed_port, never_answers, serving
from tests.unit.test_responses_objects import STREAM

CHAT = "/v1/chat/completions"
REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}}
SSE = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    b"data: [DONE]\n\n"
)


class InProcessBackend:
    """Like the embedded engine: no URL, answers through `send`."""

    def __init__(self, outcome: Outcome) -> None:
        self.name = "local"
        self.models = frozenset({"local-model"})
        self.max_concurrency = 4
        self.outcome = outcome
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        self.sent.append((endpoint, body))
        return self.outcome

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Scripted:
    """An OpenAI-compatible server to be: `running` serves `handler` on a loopback socket and points a backend
    named `name` at it."""

    name: str
    handler: Handler | Raw
    model: str = "m"
    settings: dict[str, Any] = field(default_factory=dict)

    async def start(self, stack: AsyncExitStack) -> OpenAIHttpBackend:
        served = self.handler.handle if isinstance(self.handler, Raw) else HandlerSlot(self.handler)
        url = await stack.enter_async_context(serving(served))
        return OpenAIHttpBackend(BackendSettings(name=self.name, url=url, models=[self.model], **self.settings))


@dataclass(frozen=True)
class Raw:
    """An aiohttp handler for a Scripted server, for what an httpx.Response cannot say (a connection dropped
    mid-answer)."""

    handle: RawHandler


def http_backend(name: str, handler: Handler | Raw, model: str = "m", **settings: Any) -> Scripted:
    return Scripted(name, handler, model, settings)


@asynccontextmanager
async def running(
    tmp_path: Path, *backends: Backend | Scripted, dispatching: bool = False, clock: Callable[[], float] = time.time
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'backfill.db'}")
    async with AsyncExitStack() as stack:
        ready = [await b.start(stack) if isinstance(b, Scripted) else b for b in backends]
        app: FastAPI = create_app(settings, backends=ready, run_dispatcher=dispatching, clock=clock)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://backfill") as client:
                yield client, app.state.services


def chat(model: str = "m", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


async def test_an_http_backend_gets_the_body_as_sent_and_its_answer_comes_back(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json=REPLY, headers={"x-request-id": "req-1"})

    body = b'{"model": "m",  "messages": [{"role": "user", "content": "hi"}], "temperature": 0}'
    async with running(tmp_path, http_backend("up", handler)) as (client, services):
        answer = await client.post(CHAT, content=body)

        assert (200, REPLY, "req-1") == (answer.status_code, answer.json(), answer.headers["x-request-id"])
        assert [body] == seen  # unchanged: no batch priority, not even re-serialised
        assert 1 == len(services.interactive.drain_ttft("up"))
        assert 0 == services.interactive.in_flight("up")


async def test_an_sse_stream_is_relayed_byte_for_byte(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=SSE, headers={"content-type": "text/event-stream"})

    async with running(tmp_path, http_backend("up", handler)) as (client, services):
        answer = await client.post(CHAT, content=chat(stream=True))

        assert (200, SSE) == (answer.status_code, answer.content)
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert 1 == len(services.interactive.drain_ttft("up"))


async def test_an_upstream_error_passes_through_without_a_ttft_sample(tmp_path: Path) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json=error, headers={"retry-after": "3"})

    async with running(tmp_path, http_backend("up", handler)) as (client, services):
        answer = await client.post(CHAT, content=chat())

        assert (429, error, "3") == (answer.status_code, answer.json(), answer.headers["retry-after"])
        assert [] == services.interactive.drain_ttft("up")
        registry = services.metrics.registry
        assert 1.0 == registry.get_sample_value(
            "backfill_interactive_requests_total", {"backend": "up", "outcome": "429"}
        )


@pytest.mark.parametrize(
    ("failure", "status", "code"), [("refused", 502, "backend_unavailable"), ("silent", 504, "timeout")]
)
async def test_an_unreachable_or_silent_backend_is_a_502_or_504(
    tmp_path: Path, failure: str, status: int, code: str
) -> None:
    if failure == "refused":
        backend: Backend | Scripted = OpenAIHttpBackend(
            BackendSettings(name="up", url=f"http://127.0.0.1:{closed_port()}", models=["m"])
        )
    else:
        backend = http_backend("up", never_answers, request_timeout_s=0.2)

    async with running(tmp_path, backend) as (client, services):
        answer = await client.post(CHAT, content=chat())

        assert (status, code, "server_error") == (
            answer.status_code,
            error_of(answer)["code"],
            error_of(answer)["type"],
        )
        assert 0 == services.interactive.in_flight("up")


def recording(hits: list[str], name: str) -> Scripted:
    """Notes the interactive requests it gets (not the dispatcher's probes, GET /v1/models)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            hits.append(name)
        return httpx.Response(200, json=REPLY)

    return http_backend(name, handler)


async def test_the_least_loaded_backend_gets_the_request(tmp_path: Path) -> None:
    """With the dispatcher in this process (role all), its own batch lines in flight count."""
    hits: list[str] = []
    async with running(tmp_path, recording(hits, "a"), recording(hits, "b"), dispatching=True) as (client, services):
        assert services.dispatcher is not None
        limits = services.dispatcher.core.limits
        limits["a"].in_flight = 10  # batch lines running there
        await client.post(CHAT, content=chat())
        limits["a"].in_flight = 0
        limits["b"].in_flight = 10
        await client.post(CHAT, content=chat())

    assert ["b", "a"] == hits


async def test_an_api_replica_routes_by_the_lines_workers_elsewhere_have_in_flight(tmp_path: Path) -> None:
    """With no dispatcher here (role api), the load comes from what the workers publish in the database."""
    hits: list[str] = []
    now = [1_000_000.0]
    async with running(tmp_path, recording(hits, "a"), recording(hits, "b"), clock=lambda: now[0]) as (
        client,
        services,
    ):
        assert services.dispatcher is None
        await services.store.share_batch_tokens("worker-1", {}, now[0], 5.0, flying(a=10, b=0))
        await client.post(CHAT, content=chat())
        now[0] += 2  # past the replica's one-second cache
        await services.store.share_batch_tokens("worker-1", {}, now[0], 5.0, flying(a=0, b=7))
        await services.store.share_batch_tokens("worker-2", {}, now[0], 5.0, flying(b=5))
        await client.post(CHAT, content=chat())

    assert ["b", "a"] == hits


async def test_an_in_process_backend_answers_through_send(tmp_path: Path) -> None:
    backend = InProcessBackend(Outcome(OutcomeKind.SUCCESS, 200, orjson.dumps(REPLY), usage=Usage(1, 0, 1, 0)))

    async with running(tmp_path, backend) as (client, services):
        body = chat("local-model")
        answer = await client.post("/v1/responses", content=body)

        assert (200, REPLY) == (answer.status_code, answer.json())
        assert [("/v1/responses", body)] == backend.sent
        assert 1 == len(services.interactive.drain_ttft("local"))


async def test_an_in_process_backend_refuses_to_stream(tmp_path: Path) -> None:
    backend = InProcessBackend(Outcome(OutcomeKind.SUCCESS, 200, orjson.dumps(REPLY)))

    async with running(tmp_path, backend) as (client, _):
        answer = await client.post(CHAT, content=chat("local-model", stream=True))

    assert (400, "stream") == (answer.status_code, error_of(answer)["param"])
    assert "Streaming is not supported" in error_of(answer)["message"]
    assert [] == backend.sent


@pytest.mark.parametrize(("kind", "status"), [(OutcomeKind.TIMEOUT, 504), (OutcomeKind.UNAVAILABLE, 502)])
async def test_an_in_process_failure_is_a_502_or_504(tmp_path: Path, kind: OutcomeKind, status: int) -> None:
    backend = InProcessBackend(Outcome(kind, message="The embedded generation did not finish within 1s."))

    async with running(tmp_path, backend) as (client, _):
        answer = await client.post(CHAT, content=chat("local-model"))

    assert (status, "The embedded generation did not finish within 1s.") == (
        answer.status_code,
        error_of(answer)["message"],
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [(b"[1, 2]", None), (b'{"messages": []}', "model"), (b'{"model": 3}', "model"), (b"{nope", None)],
)
async def test_a_body_without_a_model_is_a_400(tmp_path: Path, body: bytes, param: str | None) -> None:
    async with running(tmp_path, http_backend("up", lambda request: httpx.Response(200, json=REPLY))) as (client, _):
        answer = await client.post(CHAT, content=body)

    assert (400, "invalid_request_error", param) == (
        answer.status_code,
        error_of(answer)["type"],
        error_of(answer)["param"],
    )


async def test_an_unknown_model_is_a_404_listing_the_served_ones(tmp_path: Path) -> None:
    backends = (http_backend("up", lambda request: httpx.Response(200, json=REPLY), model="m"),)
    async with running(tmp_path, *backends, InProcessBackend(Outcome(OutcomeKind.SUCCESS))) as (client, _):
        answer = await client.post("/v1/embeddings", content=orjson.dumps({"model": "other", "input": "x"}))

    assert (404, "model_not_found") == (answer.status_code, error_of(answer)["code"])
    assert "Served models: local-model, m." in error_of(answer)["message"]


async def test_a_stream_that_breaks_off_ends_with_an_error_event(tmp_path: Path) -> None:
    async def one_event_then_hang_up(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SSE[:62])
        assert request.transport is not None
        request.transport.abort()
        return response

    async with running(tmp_path, http_backend("up", Raw(one_event_then_hang_up))) as (client, services):
        answer = await client.post(CHAT, content=chat(stream=True))
        outcome = {"backend": "up", "outcome": "unavailable"}
        assert 1.0 == services.metrics.registry.get_sample_value("backfill_interactive_requests_total", outcome)

    # What came before the break is passed on as it came, unless it arrived together with the hang-up (aiohttp
    # then raises before handing it over: OpenAIHttpBackend's UpstreamAnswer).
    relayed, _, error = answer.content.rstrip(b"\n").rpartition(b"\n\n")
    assert (200, True) == (answer.status_code, SSE[:62].startswith(relayed))
    assert "backend_unavailable" == orjson.loads(error.removeprefix(b"data: "))["error"]["code"]


async def test_an_engine_s_interactive_response_object_comes_back_complete_for_the_sdk(tmp_path: Path) -> None:
    """vLLM leaves out fields of a Response object that the openai SDK's model requires; through the proxy they are
    filled in (the request's own `tool_choice` kept), so `Response.model_validate` takes it."""
    engine_answer = {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}],
        "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
    }  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=engine_answer)

    async with running(tmp_path, http_backend("a", handler)) as (client, _):
        answer = await client.post("/v1/responses", json={"model": "m", "input": "hi", "tool_choice": "none"})

    assert 200 == answer.status_code
    parsed = Response.model_validate(answer.json())
    assert ([], "none", True, "Hi") == (
        parsed.tools,
        parsed.tool_choice,
        parsed.parallel_tool_calls,
        parsed.output_text,
    )


async def test_a_streamed_response_s_objects_come_back_complete_through_the_proxy(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM)

    async with running(tmp_path, http_backend("a", handler)) as (client, _):
        answer = await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})

    events = [orjson.loads(line[5:]) for line in answer.content.split(b"\n") if line.startswith(b"data:")]
    assert ["response.created", "response.output_text.delta", "response.completed"] == [e["type"] for e in events]
    completed = ResponseCompletedEvent.model_validate(events[-1])
    assert ([], "auto", "Hi") == (
        completed.response.tools,
        completed.response.tool_choice,
        completed.response.output_text,
    )


# --- usage (docs/usage.md) --------------------------------------------------------------------------------------


async def _usage_rows(services: Services) -> list[tuple[str, int, int, int]]:
    await services.interactive_usage.flush(services.store)
    rows = await services.store.usage_rows(0, 2**40)
    return [(key.kind.value, counts.requests, counts.input_tokens, counts.output_tokens) for key, counts in rows]


async def test_a_streamed_answers_final_usage_chunk_is_counted(tmp_path: Path) -> None:
    final = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    stream = SSE.replace(b"data: [DONE]", final + b"data: [DONE]")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    async with running(tmp_path, http_backend("up", handler)) as (client, services):
        await client.post(CHAT, content=chat(stream=True, stream_options={"include_usage": True}))

        assert [("interactive", 1, 9, 2)] == await _usage_rows(services)


async def test_answers_with_usage_are_counted_and_errors_are_not(tmp_path: Path) -> None:
    answers = iter([httpx.Response(200, json=REPLY), httpx.Response(400, json={"error": {"message": "bad"}})])

    async with running(tmp_path, http_backend("up", lambda request: next(answers))) as (client, services):
        await client.post(CHAT, content=chat())
        await client.post(CHAT, content=chat())

        assert [("interactive", 1, 1, 0)] == await _usage_rows(services)


async def test_an_in_process_backends_usage_is_counted(tmp_path: Path) -> None:
    backend = InProcessBackend(Outcome(OutcomeKind.SUCCESS, 200, b"{}", usage=Usage(4, 0, 3, 0)))

    async with running(tmp_path, backend) as (client, services):
        await client.post(CHAT, content=chat("local-model"))

        assert [("interactive", 1, 4, 3)] == await _usage_rows(services)
