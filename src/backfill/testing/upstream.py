"""A scriptable fake OpenAI-compatible inference server, spoken to over real HTTP by tests and benchmarks.

A request's *key* is its prompt text: the last chat message, the completion ``prompt``, the (first)
``input``, score's (first) ``text_2`` or rerank's ``query``; vLLM's ``/classify``, ``/score`` and ``/rerank`` answer
as testing/pooling.py says. Directive words inside the key make the server misbehave, e.g. ``"review 17 #fail429:2:1"``:

    #fail429:N:RA   the first N requests with this exact key get 429 with ``Retry-After: RA`` (seconds)
    #fail500:N      the first N requests with this exact key get 500; ``#fail500:always`` always does
    #bad400         always 400 (invalid_request_error); in any input of an embeddings, moderations or classify
                    request with an array ``input`` (score: ``text_2``), the whole request gets it, as an engine
                    refuses a request for one bad input
    #garbage        200 whose body is not JSON
    #hang:S         sleep S seconds, then answer 200
    #slow:MS        sleep MS milliseconds, then answer 200
    #gate:NAME      wait until gate NAME is opened (at most GATE_MAX_S), then answer 200

Other words starting with ``#`` are ordinary text. ``GET /_stats`` reports what arrived and how it was
answered (``?log=0`` leaves out the per-request log), and for embeddings, moderations, classify and score the
requests, inputs and prompt tokens answered 200; ``POST /_reset`` forgets it. ``GET /_gates/NAME`` says how many
requests wait at a gate (``{"waiting": n, "open": false}``) and ``POST /_gates/NAME`` opens it, for them and for
any that come later: a test holds lines in flight for exactly as long as it needs, whatever the
machine's speed, instead of guessing a duration. Run it with ``python -m backfill.testing.upstream --port P``.

It is a raw ASGI callable rather than a Starlette app because benchmarks run it on the same small machine
as the system under test, where a framework's routing and request objects cost a visible share of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn

from backfill.testing.pooling import POOLING

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Json = dict[str, Any]

DEFAULT_MODEL = "fake-model"
GATE_MAX_S = 300.0  # a gate nobody opens still lets its requests go, so that the upstream can always stop


@dataclass(frozen=True, slots=True)
class Script:
    """How to answer one request, as its key's directives decide."""

    status: int = 200
    retry_after: str | None = None
    sleep_s: float = 0.0
    is_garbage: bool = False
    gate: str | None = None


def read_script(key: str, count: int) -> Script:
    """Apply the directives in ``key`` to the ``count``-th request (1-based) that carried it.

    Raises ValueError when a directive's arguments do not parse.
    """
    if "#" not in key:
        return Script()
    sleep_s = 0.0
    is_garbage = False
    gate = None
    for word in key.split():
        name, _, args = word.partition(":")
        if name == "#fail429":
            limit, retry_after = args.split(":")
            float(retry_after)  # reject what a client could not parse either
            if count <= int(limit):
                return Script(429, retry_after=retry_after)
        elif name == "#fail500":
            if args == "always" or count <= int(args):
                return Script(500)
        elif name == "#bad400":
            return Script(400)
        elif name == "#garbage":
            is_garbage = True
        elif name == "#hang":
            sleep_s += float(args)
        elif name == "#slow":
            sleep_s += float(args) / 1000
        elif name == "#gate":
            gate = args
    return Script(sleep_s=sleep_s, is_garbage=is_garbage, gate=gate)


# --- prompt text --------------------------------------------------------------------------------------


def content_text(content: object) -> str:
    """The text of a message's content: a string, or the text parts of a list joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def input_texts(value: object) -> list[str]:
    """The texts of an ``input`` (or ``prompt``) field: a string, a list of strings or of message items."""
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            texts.append(content_text(item.get("content")))
        else:  # token ids
            texts.append("")
    return texts


def chat_key(body: Json) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return content_text(messages[-1].get("content"))
    return ""


def prompt_key(body: Json) -> str:
    texts = input_texts(body.get("prompt"))
    return texts[0] if texts else ""


def input_key(body: Json) -> str:
    texts = input_texts(body.get("input"))
    return texts[0] if texts else ""


# --- response bodies ----------------------------------------------------------------------------------


def _count_words(text: str) -> int:
    return len(text.split())


def _new_hex() -> str:
    return os.urandom(12).hex()


def _reply_to(key: str) -> str:
    return f"This is a fake reply to {_count_words(key)} words."


def _model(body: Json) -> Any:
    return body.get("model", DEFAULT_MODEL)


def build_chat(body: Json, key: str) -> Json:
    messages = body.get("messages")
    texts = (
        [content_text(m.get("content")) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    )
    prompt_tokens = sum(map(_count_words, texts)) + 1
    reply = _reply_to(key)
    completion_tokens = _count_words(reply)
    return {
        "id": "chatcmpl-" + _new_hex(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _model(body),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def build_completion(body: Json, key: str) -> Json:
    prompt_tokens = _count_words(key) + 1
    reply = _reply_to(key)
    completion_tokens = _count_words(reply)
    return {
        "id": "cmpl-" + _new_hex(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": _model(body),
        "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _embed(item: object, dimensions: int = 8) -> list[float]:
    """Deterministic floats in [-1, 1], one per nibble of the input's checksum: eight, or `dimensions` (the request's
    own parameter, as OpenAI's API takes it) by repeating them, so a benchmark can ask for vectors of a real
    model's size."""
    checksum = zlib.crc32(orjson.dumps(item))
    eight = [((checksum >> (4 * i)) & 0xF) / 7.5 - 1.0 for i in range(8)]
    return eight if dimensions == 8 else (eight * (dimensions // 8 + 1))[:dimensions]


def build_embeddings(body: Json, key: str) -> Json:
    value = body.get("input")
    # A list of ints is one input given as token ids; any other list holds one input per element.
    items = value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
    prompt_tokens = sum(len(i) if isinstance(i, list) else _count_words(str(i)) + 1 for i in items)
    dimensions = body.get("dimensions")
    dimensions = dimensions if isinstance(dimensions, int) and dimensions > 0 else 8
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embed(item, dimensions)} for i, item in enumerate(items)
        ],
        "model": _model(body),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def build_response(body: Json, key: str) -> Json:
    input_tokens = sum(map(_count_words, input_texts(body.get("input")))) + 1
    reply = _reply_to(key)
    output_tokens = _count_words(reply)
    return {
        "id": "resp_" + _new_hex(),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "model": _model(body),
        "output": [
            {
                "type": "message",
                "id": "msg_" + _new_hex(),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_UNFLAGGED = {
    "flagged": False,
    "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
    "category_scores": dict.fromkeys(_MODERATION_CATEGORIES, 0.0),
}


def build_moderation(body: Json, key: str) -> Json:
    results = [_UNFLAGGED] * len(input_texts(body.get("input")))
    return {
        "id": "modr-" + _new_hex(),
        "model": body.get("model", "omni-moderation-latest"),
        "results": results,
    }


# Paths whose requests backfill merges (domain/coalescing.py) -> the field that holds their inputs
_ARRAY_INPUT_PATHS = {
    "/v1/embeddings": "input",
    "/v1/moderations": "input",
    "/classify": "input",
    "/score": "text_2",
    "/v1/score": "text_2",
}
KeyFn = Callable[[Json], str]
BuildFn = Callable[[Json, str], Json]


def _pooling(path: str) -> tuple[KeyFn, BuildFn]:
    """vLLM's classify, score or rerank (testing/pooling.py): keyed by the first text of its inputs' field."""
    field, answer = POOLING[path]

    def key(body: Json) -> str:
        texts = input_texts(body.get(field))
        return texts[0] if texts else ""

    def build(body: Json, key: str) -> Json:
        return answer(body, _model(body), lambda text: _count_words(text) + 1)

    return key, build


ENDPOINTS: dict[str, tuple[KeyFn, BuildFn]] = {
    "/v1/chat/completions": (chat_key, build_chat),
    "/v1/completions": (prompt_key, build_completion),
    "/v1/embeddings": (input_key, build_embeddings),
    "/v1/responses": (input_key, build_response),
    "/v1/moderations": (input_key, build_moderation),
    **{path: _pooling(path) for path in POOLING},
}


def error_envelope(message: str, error_type: str, param: str | None = None, code: str | None = None) -> Json:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


_ERRORS: dict[int, bytes] = {
    400: orjson.dumps(error_envelope("Invalid parameter: messages", "invalid_request_error", "messages")),
    429: orjson.dumps(error_envelope("Rate limit reached", "rate_limit_error", code="rate_limit_exceeded")),
    500: orjson.dumps(error_envelope("The server had an error while processing your request.", "server_error")),
}
_GARBAGE = b"this is not json"


# --- the app ------------------------------------------------------------------------------------------


class FakeUpstream:
    """The ASGI app: answers the OpenAI inference endpoints as the key's directives script it."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.reset()

    def reset(self) -> None:
        for gate in getattr(self, "gates", {}).values():
            gate.opened.set()  # nobody is left waiting on a gate that is forgotten
        self.gates: dict[str, _Gate] = {}
        self.total = 0
        self.by_key: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.log: list[tuple[float, str, str, int]] = []
        # embeddings, moderations, classify and score: path -> requests, inputs and prompt tokens answered 200
        self.answered: dict[str, dict[str, int]] = {}

    def stats(self, with_log: bool = True) -> Json:
        """Counts of requests received (total, by key) and answered (by status), and a log of the answers.

        A log entry is appended when its request is answered, with the time the request arrived.
        """
        stats: Json = {
            "total": self.total,
            "by_key": dict(self.by_key),
            "by_status": {str(status): n for status, n in self.by_status.items()},
        }
        if self.answered:
            stats["answered"] = {path: dict(counts) for path, counts in self.answered.items()}
        if with_log:
            stats["log"] = [{"t": t, "path": path, "key": key, "status": status} for t, path, key, status in self.log]
        return stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._serve_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _serve_lifespan(receive, send)

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = ENDPOINTS.get(path)
        if endpoint is not None and method == "POST":
            await self._serve_inference(path, endpoint, receive, send)
        elif path == "/_stats" and method == "GET":
            stats = self.stats(with_log=b"log=0" not in scope["query_string"])
            await _send(send, 200, orjson.dumps(stats))
        elif path == "/_reset" and method == "POST":
            self.reset()
            await _send(send, 200, b'{"ok":true}')
        elif path.startswith("/_gates/") and method in ("GET", "POST"):
            gate = self._gate(path.removeprefix("/_gates/"))
            if method == "POST":
                gate.opened.set()
            await _send(send, 200, orjson.dumps({"waiting": gate.waiting, "open": gate.opened.is_set()}))
        else:
            await _send(send, 404, orjson.dumps(error_envelope(f"Unknown route: {method} {path}", "not_found")))

    async def _serve_inference(self, path: str, endpoint: tuple[KeyFn, BuildFn], receive: Receive, send: Send) -> None:
        arrived_at = time.time()
        try:
            body = orjson.loads(await _read_body(receive))
        except orjson.JSONDecodeError:
            body = None
        key = endpoint[0](body) if isinstance(body, dict) else ""
        self.total += 1
        count = self.by_key[key] = self.by_key.get(key, 0) + 1
        status, payload, headers = await self._answer(key, count, body, endpoint[1], path)
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.log.append((arrived_at, path, key, status))
        await _send(send, status, payload, headers)

    async def _answer(
        self, key: str, count: int, body: object, build: BuildFn, path: str
    ) -> tuple[int, bytes, Headers]:
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            return 400, orjson.dumps(error_envelope(message, "invalid_request_error")), []
        field = _ARRAY_INPUT_PATHS.get(path)
        if field is not None and any("#bad400" in text for text in input_texts(body.get(field))[1:]):
            return 400, _ERRORS[400], []
        try:
            script = read_script(key, count)
        except ValueError:
            message = f"Malformed test directive in {key!r}"
            return 400, orjson.dumps(error_envelope(message, "invalid_request_error")), []
        if script.status != 200:
            headers = [] if script.retry_after is None else [(b"retry-after", script.retry_after.encode())]
            return script.status, _ERRORS[script.status], headers
        if script.gate is not None:
            await self._gate(script.gate).passage()
        sleep_s = script.sleep_s + self.delay_s
        if sleep_s > 0:
            await asyncio.sleep(sleep_s)
        if script.is_garbage:
            return 200, _GARBAGE, []
        try:
            answer = build(body, key)
        except ValueError as exc:  # a pooling body it cannot answer, as vLLM refuses it
            return 400, orjson.dumps(error_envelope(str(exc), "invalid_request_error")), []
        if field is None:
            return 200, orjson.dumps(answer), []
        counts = self.answered.setdefault(path, {"requests": 0, "inputs": 0, "prompt_tokens": 0})
        counts["requests"] += 1
        counts["inputs"] += len(answer.get("data") or answer.get("results") or ())
        usage = answer.get("usage")
        counts["prompt_tokens"] += usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
        return 200, orjson.dumps(answer), []

    def _gate(self, name: str) -> _Gate:
        return self.gates.setdefault(name, _Gate())


class _Gate:
    """Requests wait here until the gate opens (for good)."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0

    async def passage(self) -> None:
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.opened.wait(), GATE_MAX_S)
        finally:
            self.waiting -= 1


def create_upstream_app(delay_s: float = 0.0) -> FakeUpstream:
    """A fresh fake upstream; every successful answer waits ``delay_s`` first."""
    return FakeUpstream(delay_s)


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


async def _send(send: Send, status: int, payload: bytes, headers: Headers | None = None) -> None:
    response_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", b"req_" + os.urandom(12).hex().encode()),
    ]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})


async def _serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m backfill.testing.upstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before every successful answer")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_upstream_app(args.delay_ms / 1000),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
