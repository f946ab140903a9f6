"""Optional request features a backend may or may not accept, so a request it cannot serve fails with a clear
message up front instead of being sent and refused (or, worse, silently trimmed)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Feature(StrEnum):
    IMAGES = "images"  # image content parts
    TOOLS = "tools"  # tool definitions, tool calls and tool results
    TOP_K = "top_k"  # the top_k sampling parameter (vLLM, SGLang, llama.cpp; not OpenAI's API)
    PREFILL = "prefill"  # continue a final assistant message (vLLM/SGLang `continue_final_message`)


ALL_FEATURES = frozenset(Feature)


def common_features(per_backend: Iterable[frozenset[Feature]]) -> frozenset[Feature]:
    """What every backend of a pool accepts: a request may be sent to any of them."""
    common = ALL_FEATURES
    for features in per_backend:
        common &= features
    return common
