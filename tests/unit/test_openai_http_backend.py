"""OpenAIHttpBackend against a server on a loopback socket: every kind of answer becomes an Outcome.

Batch lines go through the backend's own client (aiohttp), as in production; the handlers are written as for
httpx.MockTransport (tests/support/handler_server.py)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from backfill.backends.openai_http import OpenAIHttpBackend, parse_retry_after
from backfill.config import BackendSettings
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from tests.support.handler_server import Handler, HandlerSlot, RawHandler, closed_port, never_answers, serving

CHAT = "/v1/chat/completions"
REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
CHAT_REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
}
ERROR = {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}}

UPSTREAM = "http://upstream:8000"
MakeBackend = Callable[..., OpenAIHttpBackend]


@pytest.fixture
async def make_backend() -> AsyncIterator[MakeBackend]:
    """A backend whose server runs `handler`; `url` is written as if the server were UPSTREAM."""
    made: list[OpenAIHttpBackend] = []
    slot = HandlerSlot()
    async with serving(slot) as base:

        def make(handler: Handler, url: str = UPSTREAM, **settings: Any) -> OpenAIHttpBackend:
            slot.handler = handler
            config = BackendSettings(name="up", url=url.replace(UPSTREAM, base), models=["m"], **settings)
            made.append(OpenAIHttpBackend(config))
            return made[-1]

        yield make
        for backend in made:
            await backend.close()


def answer(status: int, payload: object = None, *, content: bytes | None = None, **headers: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        body = content if content is not None else orjson.dumps(payload)
        return httpx.Response(status, content=body, headers={k.replace("_", "-"): v for k, v in headers.items()})

    return handler


async def test_success_carries_status_request_id_body_and_usage(make_backend: MakeBackend) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CHAT_REPLY, headers={"x-request-id": "req_up_1"})

    outcome = await make_backend(handler).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.SUCCESS == outcome.kind
    assert 200 == outcome.status_code
    assert "req_up_1" == outcome.request_id
    assert outcome.body is not None
    assert CHAT_REPLY == orjson.loads(outcome.body)
    assert Usage(11, 0, 4, 0) == outcome.usage
    assert not outcome.is_retryable
    [request] = seen
    assert "POST" == request.method
    assert "/v1/chat/completions" == request.url.path
    assert REQUEST == request.content
    assert "application/json" == request.headers["content-type"]
    assert "authorization" not in request.headers


async def test_api_key_is_sent_as_bearer_token(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_TEST_KEY", "sk-upstream")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CHAT_REPLY)

    await make_backend(handler, api_key_env="UPSTREAM_TEST_KEY").send(CHAT, REQUEST, 30.0)

    assert "Bearer sk-upstream" == seen[0].headers["authorization"]


@pytest.mark.parametrize(
    "url",
    ["http://upstream:8000", "http://upstream:8000/", "http://upstream:8000/v1", "http://upstream:8000/v1/"],
)
async def test_base_url_with_or_without_v1_reaches_the_same_path(make_backend: MakeBackend, url: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=CHAT_REPLY)

    await make_backend(handler, url=url).send("/v1/embeddings", REQUEST, 30.0)

    assert ["/v1/embeddings"] == seen


async def test_base_url_path_prefix_is_kept(make_backend: MakeBackend) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=CHAT_REPLY)

    await make_backend(handler, url=f"{UPSTREAM}/team-a/v1").send(CHAT, REQUEST, 30.0)

    assert ["/team-a/v1/chat/completions"] == seen


async def test_pretty_printed_body_is_stored_compactly(make_backend: MakeBackend) -> None:
    pretty = orjson.dumps(CHAT_REPLY, option=orjson.OPT_INDENT_2)
    assert b"\n" in pretty

    outcome = await make_backend(answer(200, content=pretty)).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.SUCCESS == outcome.kind
    assert orjson.dumps(CHAT_REPLY) == outcome.body


async def test_a_one_line_body_is_stored_as_the_engine_sent_it(make_backend: MakeBackend) -> None:
    # Spaces between tokens, a float the way the engine wrote it, a trailing line break: no re-serialising.
    sent = b'{"id": "chatcmpl-1", "object": "chat.completion", "score": 1.50e-3, "usage": {"prompt_tokens": 3}}\r\n'

    outcome = await make_backend(answer(200, content=sent)).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.SUCCESS == outcome.kind
    assert sent.strip() == outcome.body
    assert outcome.answer is not None
    assert ["id", "object", "score", "usage"] == list(outcome.answer)
    assert b"1.50e-3" == bytes(outcome.answer["score"])  # read, never parsed
    assert 3 == outcome.usage.input_tokens


@pytest.mark.parametrize(
    "content",
    [
        b'{"data": [{"embedding": [0.1, 0.2.3]}]}',  # a malformed number deep inside
        b'{"data": [{"embedding": [0.1], "note": "caf\xe9"}]}',  # a string that is not UTF-8, deep inside
        b'{"data": [{"embedding": [0.1]}]} {}',  # two values
    ],
)
async def test_a_one_line_answer_that_is_not_one_json_object_is_refused(
    make_backend: MakeBackend, content: bytes
) -> None:
    outcome = await make_backend(answer(200, content=content)).send("/v1/embeddings", REQUEST, 30.0)

    assert OutcomeKind.UNAVAILABLE == outcome.kind
    assert "not a JSON object" in outcome.message


async def test_429_with_retry_after_seconds(make_backend: MakeBackend) -> None:
    outcome = await make_backend(answer(429, ERROR, retry_after="7")).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.HTTP_ERROR == outcome.kind
    assert 429 == outcome.status_code
    assert 7.0 == outcome.retry_after_s
    assert outcome.body is not None
    assert ERROR == orjson.loads(outcome.body)
    assert outcome.is_retryable


async def test_429_with_retry_after_http_date(make_backend: MakeBackend) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)

    outcome = await make_backend(answer(429, ERROR, retry_after=when)).send(CHAT, REQUEST, 30.0)

    assert outcome.retry_after_s is not None
    assert 115 <= outcome.retry_after_s <= 121  # the date has whole seconds; the test takes some time


async def test_429_without_retry_after(make_backend: MakeBackend) -> None:
    outcome = await make_backend(answer(429, ERROR)).send(CHAT, REQUEST, 30.0)

    assert outcome.retry_after_s is None
    assert outcome.is_retryable


async def test_500_is_a_retryable_http_error_with_its_body(make_backend: MakeBackend) -> None:
    body = {"error": {"message": "oops", "type": "server_error", "param": None, "code": None}}

    outcome = await make_backend(answer(500, body, x_request_id="req_9")).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.HTTP_ERROR == outcome.kind
    assert 500 == outcome.status_code
    assert "req_9" == outcome.request_id
    assert outcome.body is not None
    assert body == orjson.loads(outcome.body)
    assert outcome.is_retryable


async def test_error_with_non_json_body_is_wrapped_in_an_error_envelope(make_backend: MakeBackend) -> None:
    outcome = await make_backend(answer(502, content=b"<html>Bad Gateway</html>")).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.HTTP_ERROR == outcome.kind
    assert outcome.body is not None
    error = orjson.loads(outcome.body)["error"]
    assert "<html>Bad Gateway</html>" == error["message"]
    assert {"message", "type", "param", "code"} == set(error)


async def test_400_is_not_retryable(make_backend: MakeBackend) -> None:
    outcome = await make_backend(answer(400, ERROR)).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.HTTP_ERROR == outcome.kind
    assert not outcome.is_retryable


async def test_timeout_is_a_timeout_outcome(make_backend: MakeBackend) -> None:
    outcome = await make_backend(never_answers).send(CHAT, REQUEST, 0.2)

    assert OutcomeKind.TIMEOUT == outcome.kind
    assert outcome.status_code is None
    assert outcome.body is None
    assert "timeout" == outcome.error_code
    assert "0.2s" in outcome.message
    assert outcome.is_retryable


async def test_per_backend_timeout_overrides_the_callers(make_backend: MakeBackend) -> None:
    outcome = await make_backend(never_answers, request_timeout_s=0.2).send(CHAT, REQUEST, 42.0)

    assert (OutcomeKind.TIMEOUT, True) == (outcome.kind, "0.2s" in outcome.message)


async def test_a_refused_connection_is_unreachable() -> None:
    backend = OpenAIHttpBackend(BackendSettings(name="up", url=f"http://127.0.0.1:{closed_port()}", models=["m"]))
    try:
        outcome = await backend.send(CHAT, REQUEST, 30.0)
    finally:
        await backend.close()

    assert OutcomeKind.UNAVAILABLE == outcome.kind
    assert outcome.unreachable
    assert outcome.status_code is None
    assert "backend_unavailable" == outcome.error_code
    assert "could not be reached" in outcome.message
    assert outcome.is_retryable


async def sent_to(handler: RawHandler, lines: int = 1) -> list[Outcome]:
    """Send `lines` lines one after another to a server that runs the aiohttp `handler` (for what an
    httpx.Response cannot say)."""
    async with serving(handler) as base:
        backend = OpenAIHttpBackend(BackendSettings(name="up", url=base, models=["m"]))
        try:
            return [await backend.send(CHAT, REQUEST, 30.0) for _ in range(lines)]
        finally:
            await backend.close()


async def test_a_connection_dropped_before_the_answer_is_unavailable_not_unreachable() -> None:
    async def hang_up(request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    [outcome] = await sent_to(hang_up)

    assert (OutcomeKind.UNAVAILABLE, False, True) == (outcome.kind, outcome.unreachable, outcome.is_retryable)
    assert "could not be reached" in outcome.message


async def test_body_that_cannot_be_decoded_is_unavailable() -> None:
    async def not_gzip(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"not gzip", headers={"content-encoding": "gzip"})

    [outcome] = await sent_to(not_gzip)

    assert OutcomeKind.UNAVAILABLE == outcome.kind
    assert "could not be read" in outcome.message
    assert outcome.is_retryable


async def test_lines_one_after_another_share_one_connection() -> None:
    peers: list[object] = []

    async def reply(request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response(CHAT_REPLY)

    outcomes = await sent_to(reply, lines=3)

    assert [OutcomeKind.SUCCESS] * 3 == [outcome.kind for outcome in outcomes]
    assert 3 == len(peers)
    assert 1 == len(set(peers))


@pytest.mark.parametrize("content", [b"this is not json", b"[1, 2, 3]", b""], ids=["text", "array", "empty"])
async def test_200_without_a_json_object_is_unavailable(make_backend: MakeBackend, content: bytes) -> None:
    outcome = await make_backend(answer(200, content=content)).send(CHAT, REQUEST, 30.0)

    assert OutcomeKind.UNAVAILABLE == outcome.kind
    assert outcome.body is None
    assert outcome.is_retryable


# --- parse_retry_after: time is an argument -------------------------------------------------------------


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12", 12.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),
        (None, None),
        ("", None),
        ("soon", None),
    ],
    ids=["seconds", "fraction", "zero", "negative", "date", "past-date", "absent", "empty", "garbage"],
)
def test_retry_after_parses_seconds_and_http_dates(value: str | None, expected: float | None) -> None:
    assert expected == parse_retry_after(value, NOW)


async def test_an_interactive_stream_never_waits_for_a_connection_a_batch_line_holds(
    make_backend: MakeBackend,
) -> None:
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if b"batch" in request.content:
            await release.wait()
            return httpx.Response(200, json=CHAT_REPLY)
        return httpx.Response(200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    backend = make_backend(handler, max_concurrency=1)
    line = asyncio.ensure_future(backend.send(CHAT, b'{"model":"m","batch":true}', 30.0))
    stream = await backend.open_stream(CHAT, REQUEST, 5.0)  # the one batch connection is taken
    try:
        assert (200, b"data: [DONE]\n\n") == (stream.status_code, await stream.read())
        assert not line.done()
    finally:
        await stream.aclose()
        release.set()
    assert OutcomeKind.SUCCESS == (await line).kind


async def test_an_interactive_answer_comes_as_sent_and_closing_it_early_drops_the_connection() -> None:
    left = asyncio.Event()

    async def endless(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "content-encoding": "gzip"})
        await response.prepare(request)
        await response.write(b"raw bytes, not gzip\n")
        try:
            await asyncio.Event().wait()  # more to come, never sent: the stream is open until the client leaves
        except asyncio.CancelledError:  # the client left (the server cancels the handler then)
            left.set()
            raise
        return response

    async with serving(endless) as base:
        backend = OpenAIHttpBackend(BackendSettings(name="up", url=base, models=["m"]))
        try:
            answer = await backend.open_stream(CHAT, REQUEST, 5.0)
            chunk = await anext(aiter(answer.chunks()))
            await answer.aclose()
            await asyncio.wait_for(left.wait(), 10.0)
        finally:
            await backend.close()

    assert chunk.startswith(b"raw bytes, not gzip")  # passed on undecoded
    assert "gzip" == answer.headers["content-encoding"]
