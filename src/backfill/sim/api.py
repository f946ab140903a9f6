"""The OpenAI wire format as the simulator speaks it: request bodies in, answers and stream chunks out.

Validation follows vLLM's OpenAI server where the two differ from OpenAI: ``ignore_eos`` and ``priority`` are
accepted at the top level, a prompt longer than ``max_model_len`` is a 400, and a model name other than the
served one is a 404. Only one choice (``n`` = 1) and one completion prompt per request are simulated.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any, Literal

from backfill.errors import InvalidRequest, NotFound
from backfill.sim.engine import FinishReason
from backfill.sim.profile import EngineProfile
from backfill.sim.tokens import (
    count_text_tokens,
    embed,
    ids_prefix_hashes,
    render_chat,
    text_prefix_hashes,
)
from backfill.testing.pooling import POOLING, score_pairs
from backfill.testing.upstream import content_text

Json = dict[str, Any]
Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the engine sees it."""

    tokens: int
    prefix_blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Generation:
    """A valid chat or completion request."""

    kind: Kind
    prompt: Prompt
    max_tokens: int
    ignore_eos: bool
    priority: int
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class Embeddings:
    """A valid embeddings request: one prompt per input."""

    texts: list[str]
    prompts: list[Prompt]
    dimensions: int
    is_base64: bool


def parse_generation(body: Json, kind: Kind, profile: EngineProfile) -> Generation:
    """Raises InvalidRequest (400) or NotFound (404, unknown model)."""
    _check_model(body, profile)
    prompt = _chat_prompt(body, profile) if kind == "chat" else _completion_prompt(body, profile)
    if _optional(body, "n", int, 1) != 1:
        raise InvalidRequest("The simulator generates one choice per request; n must be 1.", param="n")
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise InvalidRequest("Stream options can only be defined when `stream=True`.", param="stream_options")
    include_usage = options is not None and options.get("include_usage") is True
    priority = _optional(body, "priority", int, 0)
    if priority != 0 and profile.scheduling_policy != "priority":
        raise InvalidRequest(f"Got priority {priority} but Priority scheduling is not enabled.", param="priority")
    room = profile.max_model_len - prompt.tokens
    if room < 1:
        raise InvalidRequest(
            f"This model's maximum context length is {profile.max_model_len} tokens. However, your request has "
            f"{prompt.tokens} input tokens. Please reduce the length of the input messages.",
            param="messages" if kind == "chat" else "prompt",
        )
    field = (
        "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _optional(body, field, int, room)
    if max_tokens < 1:
        raise InvalidRequest(f"{field} must be at least 1, got {max_tokens}.", param=field)
    if max_tokens > room:
        raise InvalidRequest(
            f"This model's maximum context length is {profile.max_model_len} tokens. However, you requested "
            f"{prompt.tokens + max_tokens} tokens ({prompt.tokens} in the input, {max_tokens} in the output). "
            "Please reduce the length of the input or the output.",
            param=field,
        )
    ignore_eos = _optional(body, "ignore_eos", bool, False)
    return Generation(kind, prompt, max_tokens, ignore_eos, priority, stream, include_usage)


def parse_embeddings(body: Json, profile: EngineProfile) -> Embeddings:
    _check_model(body, profile)
    value = body.get("input")
    # A list of ints is one input given as token ids; any other list holds one input per element.
    items = value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
    texts: list[str] = []
    prompts: list[Prompt] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            prompts.append(_text_prompt(item, profile))
        elif _is_token_ids(item) and item:
            texts.append(" ".join(map(str, item)))
            prompts.append(Prompt(len(item), ids_prefix_hashes(item, profile.block_size)))
        else:
            raise InvalidRequest("input must be a string, a list of strings or token ids.", param="input")
        if prompts[-1].tokens > profile.max_model_len:
            raise InvalidRequest(
                f"An input has {prompts[-1].tokens} tokens, more than the {profile.max_model_len} this model takes.",
                param="input",
            )
    dimensions = _optional(body, "dimensions", int, profile.embedding_dim)
    if not 1 <= dimensions <= 4096:
        raise InvalidRequest("dimensions must be between 1 and 4096.", param="dimensions")
    encoding = _optional(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format")
    return Embeddings(texts, prompts, dimensions, encoding == "base64")


@dataclass(frozen=True, slots=True)
class Pooling:
    """A valid classify, score or rerank request: one prefill per input (or pair), and the answer to give."""

    prompts: list[Prompt]
    answer: Json


def parse_pooling(path: str, body: Json, profile: EngineProfile) -> Pooling:
    """vLLM's `/classify`, `/score` or `/rerank` (testing/pooling.py's answers). Raises InvalidRequest or NotFound."""
    _check_model(body, profile)
    field, build = POOLING[path]
    try:
        answer = build(body, profile.model, lambda text: count_text_tokens(text, profile.chars_per_token))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=field) from None
    if path == "/classify":
        items = (
            body["input"] if isinstance(body["input"], list) and not _is_token_ids(body["input"]) else [body["input"]]
        )
        texts = [item if isinstance(item, str) else " ".join(map(str, item)) for item in items]
    elif path.endswith("/score"):
        texts = [first + second for first, second in score_pairs(body)]
    else:
        documents = body["documents"] if isinstance(body["documents"], list) else [body["documents"]]
        texts = [body["query"] + document for document in documents]
    return Pooling([_text_prompt(text, profile) for text in texts], answer)


def _check_model(body: Json, profile: EngineProfile) -> None:
    model = body.get("model", profile.model)
    if model != profile.model:
        raise NotFound(f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _chat_prompt(body: Json, profile: EngineProfile) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    turns = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("Each message must be an object with a string role.", param="messages")
        turns.append((message["role"], content_text(message.get("content"))))
    return _text_prompt(render_chat(turns), profile)


def _completion_prompt(body: Json, profile: EngineProfile) -> Prompt:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return _text_prompt(prompt, profile)
    if _is_token_ids(prompt) and prompt:
        return Prompt(len(prompt), ids_prefix_hashes(prompt, profile.block_size))
    raise InvalidRequest("prompt must be one string or one list of token ids.", param="prompt")


def _text_prompt(text: str, profile: EngineProfile) -> Prompt:
    tokens = count_text_tokens(text, profile.chars_per_token)
    return Prompt(tokens, text_prefix_hashes(text, profile.chars_per_token, profile.block_size))


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _optional(body: Json, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{name} must be of type {kind.__name__}, got {value!r}.", param=name)
    return value


# --- answers ------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def answer(kind: Kind, head: Json, text: str, finish_reason: FinishReason, usage_: Json) -> Json:
    """A whole chat.completion or text_completion object; ``head`` holds its id, created and model."""
    if kind == "chat":
        message: Json = {"role": "assistant", "content": text, "refusal": None, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage_}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage_}


def chunk(kind: Kind, head: Json, text: str | None, finish_reason: FinishReason | None) -> Json:
    """One stream chunk: ``text`` None for the chat stream's opening chunk, which only names the role."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**head, "object": "text_completion", "choices": [choice]}


def usage_chunk(kind: Kind, head: Json, usage_: Json) -> Json:
    """The stream's last chunk when ``stream_options.include_usage`` asked for it: no choices, the usage."""
    return {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "choices": [],
            "usage": usage_}  # fmt: skip


def embeddings_answer(request: Embeddings, model: str) -> Json:
    data = []
    for index, text in enumerate(request.texts):
        vector = embed(text, request.dimensions)
        value: list[float] | str = vector
        if request.is_base64:  # what the openai SDK asks for by default: little-endian float32
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    prompt_tokens = sum(prompt.tokens for prompt in request.prompts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
