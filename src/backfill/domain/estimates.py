"""What the scheduler knows about a request before it runs: its shared prompt prefix and its output cap.

Prefix key. Engines with automatic prefix caching (vLLM, SGLang, llama.cpp's slots) reuse the KV cache of a
prompt prefix they have just seen, so lines that share one should run close together. The key hashes the part
of the prompt that batches typically share:

- chat / responses with more than one message: every message but the last (system prompt, few-shot turns,
  a shared document) — the last message is usually what differs from line to line;
- a single prompt (completions, one-message chat): its first `SHARED_PREFIX_CHARS` characters, which catches a
  shared document or instructions placed before the per-line question.

Lines with no usable prompt (embeddings) get key 0. Leasing in (key, line number) order keeps groups together.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

SHARED_PREFIX_CHARS = 256
_KEY_MASK = (1 << 63) - 1  # fits a signed BIGINT on every database


def prefix_key(body: dict[str, Any]) -> int:
    """A stable 63-bit key for the shared part of the request's prompt; 0 when there is none."""
    shared = _shared_part(body)
    if isinstance(body.get("instructions"), str):  # responses: instructions act as a system prompt
        shared = [body["instructions"], shared]
    if shared is None or shared == "":
        return 0
    digest = hashlib.blake2b(orjson.dumps(shared, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _KEY_MASK or 1


def _shared_part(body: dict[str, Any]) -> Any:
    messages = body.get("messages", body.get("input"))  # chat messages, or a responses request's input items
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[:-1] if len(messages) > 1 else _text_head(messages[0])
    for name in ("prompt", "input"):
        if isinstance(body.get(name), str):
            return body[name][:SHARED_PREFIX_CHARS]
    return None


def _text_head(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content[:SHARED_PREFIX_CHARS]
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return text[:SHARED_PREFIX_CHARS]
    return None


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The output cap the request asks for, under whichever name its endpoint uses; None when it sets none."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# Priced output for a line that sets no cap: long enough not to under-price chat answers, short of any model's
# context. The dispatcher replaces estimates with measured averages as results come back.
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256


def expected_output_tokens(cap: int | None) -> int:
    return min(cap, DEFAULT_EXPECTED_OUTPUT_TOKENS * 4) if cap is not None else DEFAULT_EXPECTED_OUTPUT_TOKENS
