"""vLLM's pooling APIs as the fake upstream and the simulator answer them: `/classify`, `/score` and `/rerank`.

The answers have vLLM's shapes (its pooling protocol: classify's `data` of `index`, `label`, `probs`,
`num_classes`; score's `data` of `index`, `object: "score"`, `score`; rerank's `results` of `index`, `document`,
`relevance_score`) and deterministic values, a checksum of the texts, so that a test can say what each line must
get back: `class_probs` and `pair_score`. Tokens are counted by the caller's `count` (words for the fake
upstream, the simulator's own count for it). A body these cannot answer raises `ValueError` with a message fit for
a 400, naming the field.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson

Json = dict[str, Any]
Count = Callable[[str], int]
LABELS = ("negative", "positive")


def class_probs(item: object) -> list[float]:
    """The two classes' probabilities for one classify input (a text or token ids)."""
    positive = (zlib.crc32(orjson.dumps(item)) % 1000) / 1000
    return [round(1 - positive, 3), positive]


def pair_score(first: object, second: object) -> float:
    """The score of one (text_1, text_2) pair, or of a rerank (query, document)."""
    return (zlib.crc32(orjson.dumps([first, second])) % 10000) / 10000


def _texts(value: object, field: str) -> list[Any]:
    """One input a text, an array of texts, or (classify) token ids: as a list of inputs."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(type(i) is int for i in value)):
        return [value]
    if isinstance(value, list) and value and all(isinstance(i, str) or _is_ids(i) for i in value):
        return value
    raise ValueError(f"'{field}' must be a string or a non-empty array of strings.")


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


def _tokens(item: object, count: Count) -> int:
    return len(item) if isinstance(item, list) else count(str(item))


def _usage(prompt_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}


def _head(prefix: str, model: object) -> Json:
    return {"id": f"{prefix}-{os.urandom(12).hex()}", "object": "list", "created": int(time.time()), "model": model}


def classify_answer(body: Json, model: object, count: Count) -> Json:
    """One `data` entry per input, in input order."""
    items = _texts(body.get("input"), "input")
    data = []
    for index, item in enumerate(items):
        probs = class_probs(item)
        data.append({"index": index, "label": LABELS[probs[1] > probs[0]], "probs": probs, "num_classes": 2})
    return {**_head("classify", model), "data": data, "usage": _usage(sum(_tokens(i, count) for i in items))}


def score_pairs(body: Json) -> list[tuple[str, str]]:
    """The pairs a score request asks for: one `text_1` against each `text_2` (1:N), or two arrays pairwise (N:N)."""
    first, second = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    if len(first) == 1:
        return [(first[0], item) for item in second]
    if len(first) != len(second):
        raise ValueError("'text_1' and 'text_2' must have the same length when 'text_1' is an array.")
    return list(zip(first, second, strict=True))


def score_answer(body: Json, model: object, count: Count) -> Json:
    pairs = score_pairs(body)
    data = [{"index": i, "object": "score", "score": pair_score(a, b)} for i, (a, b) in enumerate(pairs)]
    tokens = sum(count(a) + count(b) for a, b in pairs)
    return {**_head("score", model), "data": data, "usage": _usage(tokens)}


def rerank_answer(body: Json, model: object, count: Count) -> Json:
    """The documents by relevance to the query, most relevant first, the first `top_n` (0: all)."""
    query = body.get("query")
    if not isinstance(query, str):
        raise ValueError("'query' must be a string.")
    documents = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n") or 0
    if type(top_n) is not int or top_n < 0:
        raise ValueError("'top_n' must be a non-negative integer.")
    ranked = sorted(range(len(documents)), key=lambda i: -pair_score(query, documents[i]))
    results = [
        {"index": i, "document": {"text": documents[i]}, "relevance_score": pair_score(query, documents[i])}
        for i in ranked
    ]
    tokens = sum(count(query) + count(doc) for doc in documents)
    head = {k: v for k, v in _head("rerank", model).items() if k in ("id", "model")}
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {**head, "usage": usage, "results": results[: top_n or None]}


# path -> (the field whose first text is the request's key, the answer)
POOLING: dict[str, tuple[str, Callable[[Json, object, Count], Json]]] = {
    "/classify": ("input", classify_answer),
    "/score": ("text_2", score_answer),
    "/v1/score": ("text_2", score_answer),
    "/rerank": ("query", rerank_answer),
    "/v1/rerank": ("query", rerank_answer),
}
