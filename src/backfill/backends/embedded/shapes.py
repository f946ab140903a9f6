"""OpenAI request parsing and response building for the embedded engine (no model code here)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from backfill import ids

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20


class BadRequest(Exception):
    """The request body cannot be served; becomes a 400 with the OpenAI error envelope."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0: off
    grammar: str | None = None  # GBNF the output must match (response_format json_object / json_schema)
    logprobs: bool = False  # report each output token's log probability
    top_logprobs: int = 0  # and the most likely tokens at each position, up to MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class TextRequest:
    """What to generate: chat `messages` (formatted with the model's template) or a raw `prompt`."""

    sampling: Sampling
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One output token: its bytes, its log probability under the model (log-softmax of the raw logits, before
    temperature, top-p or a grammar), and the most likely tokens at its position, most likely first."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str | None = None  # the stop string that ended it, if one did
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked for: the tokens of `text`, in order


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: list[str]
    base64: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number between {low:g} and {high:g}.", key)
    return float(value)


# Parameters the embedded engine cannot honour, refused rather than silently ignored, each with the value that
# means "not asked for" (an SDK may send it explicitly).
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),  # honoured on chat and completions (see `_chat_logprobs`, `_completion_logprobs`)
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "stream": (None, False),
    "stream_options": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


def _refuse_unsupported(body: dict[str, Any], honoured: frozenset[str] = frozenset()) -> None:
    for key, defaults in _UNSUPPORTED.items():
        if key in honoured:
            continue
        if key in body and not any(body[key] == default and type(body[key]) is type(default) for default in defaults):
            raise BadRequest(f"'{key}' is not supported by the embedded engine (see README: embedded engine).", key)


def _count(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"'{key}' must be an integer between 0 and {MAX_TOP_LOGPROBS}.", key)
    return value


def _chat_logprobs(body: dict[str, Any], sampling: Sampling) -> Sampling:
    """Chat's `logprobs` (a boolean) and `top_logprobs` (0..20, only with `logprobs`), as OpenAI has them."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadRequest("'logprobs' must be a boolean.", "logprobs")
    top = _count(body, "top_logprobs")
    if top is not None and not wanted:
        raise BadRequest("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    return replace(sampling, logprobs=bool(wanted), top_logprobs=top or 0)


def _completion_logprobs(body: dict[str, Any], sampling: Sampling) -> Sampling:
    """Completions' `logprobs`: how many of the most likely tokens to report at each position (0..20)."""
    top = _count(body, "logprobs")
    return sampling if top is None else replace(sampling, logprobs=True, top_logprobs=top)


def _grammar(response_format: Any, param: str) -> str | None:
    """The GBNF an output must match for OpenAI's `response_format` (chat) or `text.format` (responses)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF  # pure Python: no model is loaded

    if kind == "json_object":
        return str(JSON_GBNF)
    if kind != "json_schema":
        raise BadRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'.", f"{param}.type")
    # Chat nests the schema under `json_schema`; the Responses API's `text.format` has it at the top level.
    spec = response_format.get("json_schema", response_format)
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise BadRequest(f"'{param}' of type 'json_schema' needs a 'schema' object.", param)
    try:
        return _schema_grammar(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())
    except (ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise BadRequest(
            f"'{param}': this JSON schema cannot be enforced by the embedded engine: {exc}", param
        ) from None


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema: str) -> str:
    """A batch's lines mostly share one schema: converted once."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(schema))


def parse_sampling(body: dict[str, Any], max_tokens_key: str = "max_tokens") -> Sampling:
    max_tokens = body.get(max_tokens_key, body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"'{max_tokens_key}' must be a positive integer.", max_tokens_key)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings.", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer.", "seed")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise BadRequest("'top_k' must be an integer; 0 or -1 turns it off.", "top_k")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("Only n=1 is supported by the embedded engine.", "n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stops,
        seed=seed,
        top_k=max(0, top_k or 0),
    )


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                raise BadRequest(f"{where}: only text content parts are supported by the embedded engine.", where)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise BadRequest(f"{where}: content must be a string or a list of text parts.", where)


def _messages(raw: Any, param: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"'{param}' must be a non-empty list of messages.", param)
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"{param}[{index}] must be an object.", f"{param}[{index}]")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"{param}[{index}].role {role!r} is not supported.", f"{param}[{index}].role")
        messages.append((str(role), _content_text(message.get("content"), f"{param}[{index}].content")))
    return tuple(messages)


def parse_chat(body: dict[str, Any]) -> TextRequest:
    if body.get("tools") or body.get("functions"):
        raise BadRequest("Tools are not supported by the embedded engine.", "tools")
    _refuse_unsupported(body, frozenset({"logprobs", "top_logprobs"}))
    sampling = replace(parse_sampling(body), grammar=_grammar(body.get("response_format"), "response_format"))
    return TextRequest(_chat_logprobs(body, sampling), messages=_messages(body.get("messages"), "messages"))


def parse_completion(body: dict[str, Any]) -> TextRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (one prompt per request).", "prompt")
    _refuse_unsupported(body, frozenset({"logprobs"}))
    return TextRequest(_completion_logprobs(body, parse_sampling(body)), prompt=prompt)


def parse_responses(body: dict[str, Any]) -> TextRequest:
    if body.get("tools"):
        raise BadRequest("Tools are not supported by the embedded engine.", "tools")
    _refuse_unsupported(body)
    text = body.get("text")
    sampling = replace(
        parse_sampling(body, "max_output_tokens"),
        grammar=_grammar(text.get("format") if isinstance(text, dict) else None, "text.format"),
    )
    raw = body.get("input")
    messages: list[tuple[str, str]] = []
    if isinstance(body.get("instructions"), str):
        messages.append(("system", body["instructions"]))
    if isinstance(raw, str):
        messages.append(("user", raw))
    else:
        messages.extend(_messages(raw, "input"))
    return TextRequest(sampling, messages=tuple(messages))


def parse_embeddings(body: dict[str, Any], dimensions: int) -> EmbeddingRequest:
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    else:
        raise BadRequest("'input' must be a string or a non-empty list of strings (token arrays are not "
                         "supported by the embedded engine).", "input")  # fmt: skip
    wanted = body.get("dimensions")
    if wanted is not None and wanted != dimensions:
        raise BadRequest(
            f"'dimensions' is not supported: all-minilm-l6-v2 always returns {dimensions} dimensions.", "dimensions"
        )
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    return EmbeddingRequest(inputs, base64=encoding == "base64")


def chat_completion(model: str, gen: Generation) -> dict[str, Any]:
    return {
        "id": ids.new_id("chatcmpl-", 12),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text, "refusal": None},
                "logprobs": None
                if gen.logprobs is None
                else {"content": _content_logprobs(gen.logprobs), "refusal": None},
                "finish_reason": gen.finish_reason,
                "stop_reason": gen.stop_reason,  # as vLLM does: tells a stop string from the end of the turn
            }
        ],
        "usage": _usage(gen),
    }


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def _content_logprobs(tokens: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """Chat's `choices[].logprobs.content`."""
    return [
        {
            "token": _token(token.piece),
            "logprob": token.logprob,
            "bytes": list(token.piece),
            "top_logprobs": [
                {"token": _token(piece), "logprob": logprob, "bytes": list(piece)} for piece, logprob in token.top
            ],
        }
        for token in tokens
    ]


def _legacy_logprobs(tokens: tuple[TokenLogprob, ...], text_offset: int) -> dict[str, Any]:
    """Completions' `choices[].logprobs`; `text_offset` counts characters from the prompt's start, as OpenAI's."""
    offsets, at = [], text_offset
    for token in tokens:
        offsets.append(at)
        at += len(_token(token.piece))
    return {
        "tokens": [_token(token.piece) for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [{_token(piece): logprob for piece, logprob in token.top} for token in tokens],
        "text_offset": offsets,
    }


def text_completion(model: str, gen: Generation, prompt: str = "") -> dict[str, Any]:
    logprobs = None if gen.logprobs is None else _legacy_logprobs(gen.logprobs, len(prompt))
    return {
        "id": ids.new_id("cmpl-", 12),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": gen.text, "logprobs": logprobs, "finish_reason": gen.finish_reason}],
        "usage": _usage(gen),
    }


def response_object(model: str, gen: Generation, request: TextRequest) -> dict[str, Any]:
    incomplete = gen.finish_reason == "length"
    return {
        "id": ids.new_id("resp_", 16),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": ids.new_id("msg_", 16),
                "status": "incomplete" if incomplete else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": gen.text, "annotations": []}],
            }
        ],
        "max_output_tokens": request.sampling.max_tokens,
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": gen.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        },
    }


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }
