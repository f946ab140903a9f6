"""Token usage: read from any endpoint's response body, summed per batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _detail(usage: dict[str, Any], key: str, field: str) -> int:
    details = usage.get(key)
    return _int(details.get(field)) if isinstance(details, dict) else 0


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    @classmethod
    def total(cls, usages: Iterable[Usage]) -> Usage:
        """The sum of `usages`, without an intermediate object each."""
        input_tokens = cached_tokens = output_tokens = reasoning_tokens = 0
        for usage in usages:
            input_tokens += usage.input_tokens
            cached_tokens += usage.cached_tokens
            output_tokens += usage.output_tokens
            reasoning_tokens += usage.reasoning_tokens
        return cls(input_tokens, cached_tokens, output_tokens, reasoning_tokens)

    def to_openai(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> Usage:
        """Usage of a chat/completions/embeddings (`prompt_tokens`…) or responses (`input_tokens`…) body."""
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return cls()
        if "input_tokens" in usage or "output_tokens" in usage:
            return cls(
                _int(usage.get("input_tokens")),
                _detail(usage, "input_tokens_details", "cached_tokens"),
                _int(usage.get("output_tokens")),
                _detail(usage, "output_tokens_details", "reasoning_tokens"),
            )
        return cls(
            _int(usage.get("prompt_tokens")),
            _detail(usage, "prompt_tokens_details", "cached_tokens"),
            _int(usage.get("completion_tokens")),
            _detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
