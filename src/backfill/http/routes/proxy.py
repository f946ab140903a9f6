"""The interactive proxy: OpenAI's online endpoints, forwarded at once to a backend that serves the model.

Interactive requests skip the batch dispatcher (its limits, queues and fair share): they go out as soon as they
arrive, ahead of any batch line waiting for a slot. The body is forwarded as the client sent it (no batch
`priority` is added) and the backend's answer comes back unchanged: status, content type and body, an SSE stream
relayed chunk by chunk. If the client goes away first, the upstream request is closed so the engine frees the
slot. Each request is measured in `services.interactive` (see `backfill.interactive` for what TTFT means here).
Keys are checked as on every route; interactive traffic is neither queued nor counted against a tenant's batch
limits, but its tokens are counted in the tenant's usage (docs/usage.md): from a successful answer's `usage`, or
a stream's last chunk that carries one. A `background: true` or `service_tier: "flex"` call is not forwarded:
it runs as a one-line batch (`backfill.http.routes.responses`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from backfill.backends.openai_http import OpenAIHttpBackend, UpstreamAnswer
from backfill.domain.outcomes import OutcomeKind
from backfill.domain.responses import StreamCompleter, complete_response
from backfill.domain.usage import Usage
from backfill.errors import BackendError, BackendTimeout, BackendUnavailable, InvalidRequest, NotFound
from backfill.http.deps import read_body, services_of, tenant_of
from backfill.http.errors import error_response
from backfill.http.openapi import ok, openai_errors, request_body
from backfill.http.routes import responses
from backfill.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EngineAnswer,
    ResponseRequest,
)
from backfill.interactive import Candidate, FirstTokenScanner, InteractiveMeter, least_loaded
from backfill.interactive_usage import InteractiveUsage, StreamUsage, usage_in_body
from backfill.ports import Backend
from backfill.services import Services

log = structlog.get_logger(__name__)
router = APIRouter(tags=["interactive"])

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_BODY_BYTES = 32 * 1024 * 1024  # long contexts and inline images: far more than a batch line's JSON
_PASSED_HEADERS = ("content-type", "content-encoding", "cache-control", "retry-after", "x-request-id")
T = TypeVar("T")


def status_label(status_code: int) -> str:
    """The outcome label of a backend's HTTP answer, as `backfill_backend_requests` names them."""
    return "429" if status_code == 429 else f"{status_code // 100}xx"


async def choose_backend(services: Services, model: str, stream: bool) -> Backend:
    """The least loaded backend serving `model` (`interactive.least_loaded`); raises NotFound if none does."""
    serving = [backend for backend in services.backends if model in backend.models]
    if not serving:
        served = sorted({name for backend in services.backends for name in backend.models})
        raise NotFound(
            f"The model `{model}` does not exist or is not served here. Served models: {', '.join(served) or 'none'}.",
            param="model",
            code="model_not_found",
        )
    batch_in_flight = await services.batch_load.in_flight()
    candidates = [
        Candidate(
            backend.name,
            backend.max_concurrency,
            batch_in_flight.get(backend.name, 0),
            services.interactive.in_flight(backend.name),
        )
        for backend in serving
    ]
    chosen = least_loaded(candidates)
    backend = next(backend for backend in serving if backend.name == chosen)
    if stream and not isinstance(backend, OpenAIHttpBackend):
        raise InvalidRequest(
            f"Streaming is not supported by the backend that serves model '{model}' (an in-process engine); "
            "send the request without `stream: true`.",
            param="stream",
        )
    return backend


def parse_head(data: bytes) -> tuple[str, bool]:
    """The request's `model` and whether it asks for a stream; raises InvalidRequest."""
    try:
        body: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    return model, body.get("stream") is True


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Receive, work: Awaitable[T]) -> tuple[T | None, bool]:
    """(result, False), or (None, True) with `work` cancelled if the client disconnects before it is done."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(receive))
    # Not awaited once cancelled: that would hold the work's result back for a turn or two of the event loop, on
    # an interactive request's way to its first token. A receive that failed means the client is gone too.
    watcher.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Work that finished wins, even if the client left meanwhile (the server reports a finished response as a
        # disconnect too); only unfinished work is given up.
        gone = not task.done()
        watcher.cancel()  # a no-op if it is done
        if gone:
            task.cancel()
            await asyncio.wait((task,))  # let the work unwind: closing its connection is what frees the slot
    if gone:
        if not task.cancelled():
            task.exception()  # nobody is left to tell
        return None, True
    return task.result(), False


def _passed_headers(answer: UpstreamAnswer) -> dict[str, str]:
    return {name: answer.headers[name] for name in _PASSED_HEADERS if name in answer.headers}


def _backend_failure(exc: BackendError) -> Response:
    timeout = isinstance(exc, BackendTimeout)
    return error_response(504 if timeout else 502, exc.message, error_type="server_error", code=exc.code)


class _Flight:
    """One interactive request's books: started now, ended exactly once; its tokens counted for its tenant."""

    def __init__(
        self, meter: InteractiveMeter, backend: str, usage: InteractiveUsage, tenant_id: str, model: str
    ) -> None:
        self.meter, self.backend = meter, backend
        self.usage, self.tenant_id, self.model = usage, tenant_id, model
        self.started = time.monotonic()
        self.ended = False
        meter.record_start(backend)

    def used(self, usage: Usage) -> None:
        self.usage.add(self.tenant_id, self.model, usage)

    def first_token(self) -> None:
        self.meter.record_first_token(self.backend, time.monotonic() - self.started)

    def end(self, outcome: str) -> None:
        if not self.ended:
            self.ended = True
            self.meter.record_end(self.backend, time.monotonic() - self.started, outcome)


class _Relay(Response):
    """An upstream SSE stream passed on chunk by chunk; closed upstream as soon as the client disconnects."""

    def __init__(self, answer: UpstreamAnswer, flight: _Flight, completer: StreamCompleter | None = None) -> None:
        """`completer`: for a /v1/responses stream, fills in the Response objects its events carry."""
        # Response.__init__ is not called: it would set a body and a Content-Length of 0.
        self.answer, self.flight, self.completer = answer, flight, completer
        self.status_code = answer.status_code
        self.background = None
        headers = _passed_headers(answer)
        headers.setdefault("cache-control", "no-cache")
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "cancelled"
        try:
            finished, gone = await _unless_gone(receive, self._relay(send))
            if not gone and finished is not None:
                outcome = finished
        except OSError:  # the server could not write to the client: it left
            pass
        finally:
            await asyncio.shield(self.answer.aclose())
            self.flight.end(outcome)

    async def _relay(self, send: Send) -> str:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        scanner = FirstTokenScanner()
        usage = StreamUsage()
        outcome = status_label(self.status_code)
        try:
            async for chunk in self.answer.chunks():
                if not scanner.seen and scanner.feed(chunk):
                    self.flight.first_token()
                usage.feed(chunk)
                if self.completer is not None:
                    chunk = self.completer.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if self.completer is not None and (rest := self.completer.flush()):
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except BackendError as exc:
            # Headers are gone already: say it the way OpenAI's servers do mid-stream, which the SDKs raise.
            log.warning("proxy.stream_broken", backend=self.flight.backend, error=exc.message)
            error = {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}}
            await send(
                {"type": "http.response.body", "body": b"data: " + orjson.dumps(error) + b"\n\n", "more_body": True}
            )
            outcome = "timeout" if isinstance(exc, BackendTimeout) else "unavailable"
        if usage.usage is not None and 200 <= self.status_code < 300:
            self.flight.used(usage.usage)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome


async def _forward_http(
    request: Request, backend: OpenAIHttpBackend, endpoint: str, body: bytes, flight: _Flight, timeout_s: float
) -> Response:
    try:
        answer, gone = await _unless_gone(request.receive, backend.open_stream(endpoint, body, timeout_s))
    except BackendError as exc:
        flight.end("timeout" if isinstance(exc, BackendTimeout) else "unavailable")
        return _backend_failure(exc)
    if answer is None or gone:
        flight.end("cancelled")
        return Response(status_code=499)  # nobody reads it
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        completer = StreamCompleter(_json_object(body)) if endpoint == "/v1/responses" else None
        return _Relay(answer, flight, completer)  # it ends the flight
    try:
        content, gone = await _unless_gone(request.receive, answer.read())
    except BackendError as exc:
        flight.end("timeout" if isinstance(exc, BackendTimeout) else "unavailable")
        return _backend_failure(exc)
    finally:
        await asyncio.shield(answer.aclose())
    if content is None or gone:
        flight.end("cancelled")
        return Response(status_code=499)
    if 200 <= answer.status_code < 300:
        flight.first_token()
        if (usage := usage_in_body(content)) is not None:
            flight.used(usage)
        if endpoint == "/v1/responses":
            content = _completed_response(content, body)
    flight.end(status_label(answer.status_code))
    return Response(content, status_code=answer.status_code, headers=_passed_headers(answer))


def _completed_response(content: bytes, request_body: bytes) -> bytes:
    """A Response object with every field the openai SDK's model requires (engines such as vLLM leave some out);
    anything that is not a JSON object passes unchanged. Only this endpoint pays for the parse."""
    answer = _json_object(content)
    return content if answer is None else orjson.dumps(complete_response(answer, _json_object(request_body)))


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


async def _forward_in_process(
    request: Request, backend: Backend, endpoint: str, body: bytes, flight: _Flight, timeout_s: float
) -> Response:
    outcome, gone = await _unless_gone(request.receive, backend.send(endpoint, body, timeout_s))
    if outcome is None or gone:
        flight.end("cancelled")
        return Response(status_code=499)
    if outcome.kind in (OutcomeKind.SUCCESS, OutcomeKind.HTTP_ERROR) and outcome.body is not None:
        status = outcome.status_code or (200 if outcome.kind is OutcomeKind.SUCCESS else 502)
        if outcome.kind is OutcomeKind.SUCCESS:
            flight.first_token()
            flight.used(outcome.usage)
        flight.end(status_label(status))
        return Response(outcome.body, status_code=status, media_type="application/json")
    message = outcome.message or f"The backend {backend.name} gave no usable answer."
    failure = BackendTimeout(message) if outcome.kind is OutcomeKind.TIMEOUT else BackendUnavailable(message)
    flight.end(outcome.kind.value)
    return _backend_failure(failure)


def _handler(endpoint: str) -> Callable[[Request], Awaitable[Response]]:
    async def proxy(request: Request) -> Response:
        # Looked up here rather than declared as FastAPI dependencies, whose resolution costs ~0.2 ms (on 2 slow
        # cores) of every interactive request's time to first token.
        services = await services_of(request)
        tenant_id = await tenant_of(request, request.headers.get("authorization"), request.headers.get("x-api-key"))
        body = await read_body(request, MAX_BODY_BYTES)
        model, stream = parse_head(body)
        if (deferred := responses.deferred_of(endpoint, body)) is not None:
            payload, flex = deferred
            return await responses.run_deferred(
                request, services, tenant_id, endpoint, payload, flex=flex, unless_gone=_unless_gone
            )
        backend = await choose_backend(services, model, stream)
        flight = _Flight(services.interactive, backend.name, services.interactive_usage, tenant_id, model)
        timeout_s = services.settings.request_timeout_s
        try:
            if isinstance(backend, OpenAIHttpBackend):
                return await _forward_http(request, backend, endpoint, body, flight, timeout_s)
            return await _forward_in_process(request, backend, endpoint, body, flight, timeout_s)
        except asyncio.CancelledError:
            flight.end("cancelled")
            raise
        except Exception:
            flight.end("unavailable")
            raise

    proxy.__name__ = "proxy_" + endpoint.removeprefix("/v1/").replace("/", "_")
    return proxy


_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponseRequest,
}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}
_ENGINE_ERROR = {
    "description": "The engine's own error answer, passed back unchanged.",
    "content": {"application/json": {}},
}

for _endpoint in ENDPOINTS:
    _responses = ok(EngineAnswer, "The engine's answer; server-sent events for `stream: true`.")
    if _endpoint != "/v1/embeddings":
        _responses[200]["content"] = _STREAM
    router.add_api_route(
        _endpoint,
        _handler(_endpoint),
        methods=["POST"],
        openapi_extra=request_body(_BODIES[_endpoint]),
        responses=_responses | openai_errors(400, 404, 413, 429, 502, 504) | {"default": _ENGINE_ERROR},
    )
