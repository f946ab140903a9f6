"""Embeddings, moderations, classify and score lines merged into one upstream request with an array of inputs, and
its answer split back into one result per line. Pure: bodies in, bodies and token counts out.

What merges: lines of one batch whose bodies are equal but for the merged field (`input`; score's `text_2`) — same
model, `dimensions`, `encoding_format`, `user`, score's `text_1`, … — and whose inputs are of one kind: text (a
string or an array of strings) or token ids (an array of ints, or an array of such arrays), since engines refuse a
list that mixes both. A line whose own field is an array carries its slice: its k inputs go into the merged
request together and its result holds their k entries, indexed 0..k-1 as if it had been sent alone. Anything else
(moderations' image parts, score's `queries`/`documents` form or a `text_1` array, an empty array, a value of no
known kind) is sent alone, unchanged.

vLLM's `/classify` takes `input` as embeddings does and answers one `data` entry per input, with its `index`.
Its `/score` with one `text_1` string and a `text_2` array scores the string against each element (1:N) and
answers one `data` entry per element: so score lines sharing their `text_1` merge on `text_2`. Rerank lines never
merge (`top_n` and the ordering by relevance belong to one query).

Usage: an engine reports one `prompt_tokens` for the whole request. It is shared out over the lines in proportion
to each line's token count — the model's tokenizer's where the backend counted each input (the embedded engine),
else exact for token ids and `estimate_text_tokens` for text — by largest remainder, so the lines' usage always sums
to exactly what the engine reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

EMBEDDINGS = "/v1/embeddings"
MODERATIONS = "/v1/moderations"
CLASSIFY = "/classify"
SCORE = "/v1/score"


@dataclass(frozen=True, slots=True)
class Shape:
    """How an endpoint's requests merge and its answers split."""

    field: str  # the body field whose inputs merge into one array
    entries: str  # the answer's field with one entry per input
    indexed: bool  # entries carry an `index`: put in input order by it, and numbered from 0 for each line
    takes_tokens: bool = True  # token-id inputs merge too
    fixed: str | None = None  # a field that must be one string (and, being in the key, equal) for lines to merge


_EMBEDDING_LIKE = Shape("input", "data", indexed=True)
_SCORE_LIKE = Shape("text_2", "data", indexed=True, takes_tokens=False, fixed="text_1")
SHAPES: dict[str, Shape] = {
    EMBEDDINGS: _EMBEDDING_LIKE,
    MODERATIONS: Shape("input", "results", indexed=False, takes_tokens=False),
    CLASSIFY: _EMBEDDING_LIKE,
    SCORE: _SCORE_LIKE,
    "/score": _SCORE_LIKE,  # vLLM serves both spellings; its own batch runner accepts either
}
COALESCED_ENDPOINTS = frozenset(SHAPES)

Json = dict[str, Any]


def estimate_text_tokens(text: str) -> int:
    """The documented estimate of a text's tokens where backfill has no tokenizer for the model: one per 4 bytes of
    UTF-8, at least 1 (what the engine reported is still what the lines sum to; this only shares it out)."""
    return max(1, math.ceil(len(text.encode()) / 4))


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


def input_items(endpoint: str, body: Json) -> tuple[str, list[Any]] | None:
    """The kind ("text" or "tokens") and the inputs of one line, or None when it cannot be merged with others."""
    shape = SHAPES[endpoint]
    if shape.fixed is not None and not isinstance(body.get(shape.fixed), str):
        return None
    value = body.get(shape.field)
    if isinstance(value, str):
        return "text", [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) for item in value):
        return "text", value
    if not shape.takes_tokens:
        return None
    if _is_tokens(value):
        return "tokens", [value]
    if all(_is_tokens(item) for item in value):
        return "tokens", value
    return None


def item_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else estimate_text_tokens(item)


class Part(msgspec.Struct, frozen=True):
    """One line's share of a merged request: its inputs, their token weight, its parameters' key."""

    key: bytes  # the body without `input`, and the inputs' kind: lines with equal keys may merge
    items: list[Any]
    weight: int


def part_of(endpoint: str, body: Json) -> Part | None:
    found = input_items(endpoint, body)
    if found is None:
        return None
    kind, items = found
    shape = SHAPES[endpoint]
    params = {k: v for k, v in body.items() if k != shape.field}
    key = kind.encode() + orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    # score: each pair's tokens hold the fixed text's as well as the element's
    shared = item_tokens(body[shape.fixed]) if shape.fixed is not None else 0
    return Part(key, items, sum(item_tokens(item) + shared for item in items))


def plan_requests(parts: Sequence[Part | None], max_inputs: int) -> list[list[int]]:
    """The upstream requests to send for these lines, as lists of their indexes: lines with equal keys together in
    their order, at most `max_inputs` inputs a request (a line with more goes alone); a line that cannot merge alone."""
    requests: list[list[int]] = []
    open_by_key: dict[bytes, tuple[list[int], int]] = {}  # key -> (the request being filled, its inputs)
    for index, part in enumerate(parts):
        if part is None:
            requests.append([index])
            continue
        current = open_by_key.get(part.key)
        if current is not None and current[1] + len(part.items) <= max_inputs:
            current[0].append(index)
            open_by_key[part.key] = (current[0], current[1] + len(part.items))
            continue
        request = [index]
        requests.append(request)
        open_by_key[part.key] = (request, len(part.items))
    return requests


def merged_body(endpoint: str, body: Json, parts: Sequence[Part]) -> bytes:
    """`body` (any one of the lines': they differ only in the merged field) with every part's inputs as one array."""
    merged = dict(body)
    merged[SHAPES[endpoint].field] = [item for part in parts for item in part.items]
    return orjson.dumps(merged)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """`total` shared out in proportion to `weights` in whole numbers summing to exactly `total` (largest
    remainder; equal shares when every weight is 0)."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


class SplitError(ValueError):
    """The engine's answer does not have one entry per input: it cannot be given back line by line."""


def split_answer(
    endpoint: str, answer: Json, parts: Sequence[Part], input_tokens: Sequence[int] = ()
) -> list[tuple[Json, int]]:
    """One (body, prompt tokens) per part from the engine's answer to their merged request: each body the answer
    the line would have had alone (its entries indexed from 0, its own usage). `input_tokens`: each input's tokens
    as the backend counted them, when it did (else the parts' weights share the usage out). Raises SplitError."""
    shape = SHAPES[endpoint]
    entries = answer.get(shape.entries)
    counts = [len(part.items) for part in parts]
    if not isinstance(entries, list) or len(entries) != sum(counts):
        raise SplitError(f"the engine answered {_count(entries)} results for {sum(counts)} inputs")
    if shape.indexed:
        entries = _in_input_order(entries)
    usage = answer.get("usage")
    reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    weights = [p.weight for p in parts]
    if len(input_tokens) == len(entries):
        bounds = list(itertools.accumulate(counts, initial=0))
        weights = [sum(input_tokens[bounds[n] : bounds[n + 1]]) for n in range(len(parts))]
    shares = apportion(reported, weights) if isinstance(reported, int) and reported >= 0 else None
    head = {k: v for k, v in answer.items() if k not in (shape.entries, "usage")}
    bodies: list[tuple[Json, int]] = []
    at = 0
    for n, part in enumerate(parts):
        mine = entries[at : at + len(part.items)]
        at += len(part.items)
        body = dict(head)
        body[shape.entries] = [{**entry, "index": i} for i, entry in enumerate(mine)] if shape.indexed else mine
        tokens = 0
        if shares is not None:
            tokens = shares[n]
            body["usage"] = {**usage, "prompt_tokens": tokens, "total_tokens": tokens}  # type: ignore[dict-item]
        bodies.append((body, tokens))
    return bodies


def _in_input_order(entries: list[Any]) -> list[Any]:
    """Entries in input order: by their `index` when each has a distinct one (engines may answer out of order)."""
    indexes = [e.get("index") if isinstance(e, dict) else None for e in entries]
    if sorted(i for i in indexes if isinstance(i, int)) != list(range(len(entries))):
        raise SplitError("the engine's answer does not carry the indexes 0..n-1")
    if indexes == list(range(len(entries))):
        return entries
    return sorted(entries, key=lambda e: e["index"])


def _count(entries: object) -> int:
    return len(entries) if isinstance(entries, list) else 0
