"""The simulator's HTTP server: vLLM's OpenAI-compatible endpoints in front of a real-time engine runner.

``POST /v1/chat/completions``, ``/v1/completions`` (both streaming or not), ``/v1/embeddings`` and vLLM's pooling
APIs ``/classify``, ``/score`` (``/v1/score``) and ``/rerank`` (``/v1/rerank``), answered as the fake upstream does;
``GET /v1/models``, ``/health`` and ``/metrics`` (vLLM's metric names). Like the fake upstream
(``backfill.testing.upstream``), ``GET /_stats`` counts what arrived, by key (the request's prompt text), and
how it was answered (``?log=0`` leaves out the per-request log); ``POST /_reset`` forgets it. A client that
goes away aborts its request in the engine, which frees its sequence slot and KV blocks.

A raw ASGI app, for the fake upstream's reason: benchmarks run simulators on the machine they measure, so a
request should cost little CPU besides the model's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from backfill.errors import ApiError, InvalidRequest, NotFound
from backfill.sim import api
from backfill.sim.engine import SimRequest
from backfill.sim.profile import EngineProfile
from backfill.sim.runner import EngineRunner, EventQueue
from backfill.sim.tokens import OutputLengths, answer_piece
from backfill.testing.pooling import POOLING
from backfill.testing.upstream import chat_key, input_key, input_texts, prompt_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Json = dict[str, Any]

_GENERATION: dict[str, api.Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's convention)


def create_sim_app(profile: EngineProfile) -> SimServer:
    """A fresh simulator; its engine task runs between the ASGI lifespan's startup and shutdown."""
    return SimServer(profile)


class SimServer:
    """The ASGI app."""

    def __init__(self, profile: EngineProfile) -> None:
        self.profile = profile
        self.runner = EngineRunner(profile)
        self._lengths = OutputLengths(profile)
        self._piece = answer_piece(profile.chars_per_token)
        self._created = int(time.time())
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.completed = 0
        self.aborted = 0
        self.by_key: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.log: list[tuple[float, str, str, int]] = []

    def stats(self, with_log: bool = True) -> Json:
        """Requests received (total, by key), answered in full, abandoned by their client, and by status."""
        stats: Json = {
            "total": self.total,
            "completed": self.completed,
            "aborted": self.aborted,
            "running": self.runner.model.num_running,
            "waiting": self.runner.model.num_waiting,
            "by_key": dict(self.by_key),
            "by_status": {str(status): n for status, n in self.by_status.items()},
        }
        if with_log:
            stats["log"] = [{"t": t, "path": path, "key": key, "status": status} for t, path, key, status in self.log]
        return stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._serve_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.runner.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runner.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path in _GENERATION:
            await self._serve_generation(path, _GENERATION[path], receive, send)
        elif method == "POST" and path == "/v1/embeddings":
            await self._serve_prefill(path, input_key, self._embeddings, receive, send)
        elif method == "POST" and path in POOLING:
            field = POOLING[path][0]
            await self._serve_prefill(path, lambda body: _first_text(body.get(field)), self._pooling, receive, send)
        elif method == "GET" and path == "/v1/models":
            await _send(send, 200, orjson.dumps(self._models()))
        elif method == "GET" and path == "/metrics":
            await _send(send, 200, self.runner.metrics.render(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
        elif method == "GET" and path == "/health":
            await _send(send, 200, b"", [])
        elif method == "GET" and path == "/_stats":
            await _send(send, 200, orjson.dumps(self.stats(with_log=b"log=0" not in scope["query_string"])))
        elif method == "POST" and path == "/_reset":
            self.reset()
            await _send(send, 200, b'{"ok":true}')
        else:
            await _send_error(send, NotFound(f"Unknown route: {method} {path}"))

    def _models(self) -> Json:
        model = {
            "id": self.profile.model,
            "object": "model",
            "created": self._created,
            "owned_by": "backfill-sim",
            "root": self.profile.root or self.profile.model,
            "parent": None,
            "max_model_len": self.profile.max_model_len,
        }
        return {"object": "list", "data": [model]}

    # --- inference -----------------------------------------------------------------------------------------

    async def _serve_generation(self, path: str, kind: api.Kind, receive: Receive, send: Send) -> None:
        arrived_at = time.time()
        body = await _read_json(receive)
        key = (chat_key if kind == "chat" else prompt_key)(body) if isinstance(body, dict) else ""
        self._count(key)
        try:
            generation = api.parse_generation(_require_object(body), kind, self.profile)
        except ApiError as exc:
            await _send_error(send, exc)
            self._log(arrived_at, path, key, exc.status_code)
            return
        output_tokens, finish_reason = self._lengths.draw(generation.max_tokens, generation.ignore_eos)
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(12).hex()
        prompt = generation.prompt
        request = SimRequest(
            request_id, prompt.tokens, prompt.prefix_blocks, output_tokens, generation.priority, time.monotonic(),
            finish_reason,
        )  # fmt: skip
        queue = self.runner.submit(request, every_token=generation.stream)
        head = {"id": request_id, "created": int(arrived_at), "model": self.profile.model}
        watcher = asyncio.create_task(_abort_on_disconnect(receive, lambda: self.runner.abort(request_id)))
        try:
            if generation.stream:
                is_done = await self._stream(send, generation, head, queue, output_tokens)
            else:
                is_done = await self._answer(send, generation, head, queue, output_tokens)
        finally:
            watcher.cancel()
            self.runner.abort(request_id)  # a no-op once it finished; else its client left or the server stops
        self._finished(is_done, arrived_at, path, key)

    async def _answer(
        self, send: Send, generation: api.Generation, head: Json, queue: EventQueue, output_tokens: int
    ) -> bool:
        event = await queue.get()
        if event is None or event.finish_reason is None:
            return False
        usage = api.usage(generation.prompt.tokens, output_tokens, event.cached_tokens)
        body = api.answer(generation.kind, head, self._piece * output_tokens, event.finish_reason, usage)
        await _send(send, 200, orjson.dumps(body))
        return True

    async def _stream(
        self, send: Send, generation: api.Generation, head: Json, queue: EventQueue, output_tokens: int
    ) -> bool:
        kind = generation.kind
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        if kind == "chat":
            await _send_event(send, api.chunk(kind, head, None, None))
        cached_tokens = 0
        while True:
            event = await queue.get()
            if event is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return False
            cached_tokens = event.cached_tokens
            await _send_event(send, api.chunk(kind, head, self._piece, event.finish_reason))
            if event.finish_reason is not None:
                break
        if generation.include_usage:
            usage = api.usage(generation.prompt.tokens, output_tokens, cached_tokens)
            await _send_event(send, api.usage_chunk(kind, head, usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return True

    def _embeddings(self, path: str, body: Json) -> tuple[list[api.Prompt], Json]:
        embeddings = api.parse_embeddings(body, self.profile)
        return embeddings.prompts, api.embeddings_answer(embeddings, self.profile.model)

    def _pooling(self, path: str, body: Json) -> tuple[list[api.Prompt], Json]:
        pooling = api.parse_pooling(path, body, self.profile)
        return pooling.prompts, pooling.answer

    async def _serve_prefill(
        self,
        path: str,
        key_of: Callable[[Json], str],
        parse: Callable[[str, Json], tuple[list[api.Prompt], Json]],
        receive: Receive,
        send: Send,
    ) -> None:
        """A pooling request (embeddings, classify, score, rerank): answered once the engine prefilled each input."""
        arrived_at = time.time()
        body = await _read_json(receive)
        key = key_of(body) if isinstance(body, dict) else ""
        self._count(key)
        try:
            prompts, answer = parse(path, _require_object(body))
        except ApiError as exc:
            await _send_error(send, exc)
            self._log(arrived_at, path, key, exc.status_code)
            return
        # Each input is a prefill-only request, as a pooling model runs it; they batch like any others.
        base_id = "pool-" + os.urandom(12).hex()
        ids = [f"{base_id}-{index}" for index in range(len(prompts))]
        queues = [
            self.runner.submit(SimRequest(request_id, prompt.tokens, prompt.prefix_blocks, 0), every_token=False)
            for request_id, prompt in zip(ids, prompts, strict=True)
        ]
        watcher = asyncio.create_task(_abort_on_disconnect(receive, lambda: self._abort_all(ids)))
        try:
            is_done = True
            for queue in queues:
                if await queue.get() is None:
                    is_done = False
                    break
            if is_done:
                await _send(send, 200, orjson.dumps(answer))
        finally:
            watcher.cancel()
            self._abort_all(ids)
        self._finished(is_done, arrived_at, path, key)

    def _abort_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.runner.abort(request_id)

    # --- stats ---------------------------------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.total += 1
        self.by_key[key] = self.by_key.get(key, 0) + 1

    def _log(self, arrived_at: float, path: str, key: str, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.log.append((arrived_at, path, key, status))

    def _finished(self, is_done: bool, arrived_at: float, path: str, key: str) -> None:
        if is_done:
            self.completed += 1
        else:
            self.aborted += 1
        self._log(arrived_at, path, key, 200 if is_done else _CLIENT_GONE)


async def _abort_on_disconnect(receive: Receive, abort: Callable[[], None]) -> None:
    """Call ``abort`` when the client disconnects (the body was read already, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    abort()


def _first_text(value: object) -> str:
    texts = input_texts(value)
    return texts[0] if texts else ""


def _require_object(body: object) -> Json:
    if not isinstance(body, dict):
        raise InvalidRequest("We could not parse the JSON body of your request.")
    return body


async def _read_json(receive: Receive) -> Any:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        return None


async def _send(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    response_headers = [*(_JSON_HEADERS if headers is None else headers), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_error(send: Send, exc: ApiError) -> None:
    error = {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    await _send(send, exc.status_code, orjson.dumps({"error": error}))


async def _send_event(send: Send, chunk: Json) -> None:
    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True})
