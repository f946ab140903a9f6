"""Run lines the dispatch core started together (embeddings, moderations, classify, score) as few upstream
requests, and give each line the outcome it would have had alone. The merging and splitting are
domain/coalescing.py's; this performs them.

- Lines are read from the input blob in one ranged read when they lie close together (they were leased in order).
- Lines with equal parameters go in one request, up to the backend's `max_inputs_per_request` inputs; lines whose
  parameters differ (rare within a batch) go in further requests, one after another: the core gave them one slot.
- An answer that refuses the request (a 4xx other than 408/429: a bad input, a request too large) is not the
  lines' fault until it is narrowed down: the request is split in halves and each half sent again, so the line the
  engine refuses ends with its own refusal and the others succeed. Anything else (429, 5xx, a timeout, no
  connection) is the same outcome for every line: the core's retry policy and circuit breaker judge each line as
  if it had been sent alone, so an outage charges none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from backfill import ids, rawjson
from backfill.domain.coalescing import SHAPES, Part, SplitError, merged_body, part_of, plan_requests, split_answer
from backfill.domain.leases import LeasedLine
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.ports import Backend, BlobStore

_SPAN_SLACK_BYTES = 1 << 16


async def read_lines(blobs: BlobStore, key: str, lines: Sequence[LeasedLine]) -> list[bytes]:
    """Each line's bytes: one read of the span they lie in when little else lies between them, else one each."""
    if not lines:
        return []
    low = min(line.offset for line in lines)
    high = max(line.offset + line.length for line in lines)
    if high - low > 2 * sum(line.length for line in lines) + _SPAN_SLACK_BYTES:
        return [await blobs.read_range(key, line.offset, line.length) for line in lines]
    span = await blobs.read_range(key, low, high - low)
    return [span[line.offset - low : line.offset - low + line.length] for line in lines]


async def send_together(
    backend: Backend, endpoint: str, bodies: Sequence[dict[str, Any]], timeout_s: float, max_inputs: int
) -> list[Outcome]:
    """One outcome per body, in order, from as few requests as `max_inputs` and the bodies' parameters allow."""
    parts = [part_of(endpoint, body) for body in bodies]
    outcomes: list[Outcome | None] = [None] * len(bodies)
    for indexes in plan_requests(parts, max_inputs):
        await _send(backend, endpoint, bodies, parts, indexes, timeout_s, outcomes)
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


async def _send(
    backend: Backend,
    endpoint: str,
    bodies: Sequence[dict[str, Any]],
    parts: Sequence[Part | None],
    indexes: list[int],
    timeout_s: float,
    outcomes: list[Outcome | None],
) -> None:
    if len(indexes) == 1:  # alone: the line's own body, and the engine's own answer to it
        outcomes[indexes[0]] = await backend.send(endpoint, orjson.dumps(bodies[indexes[0]]), timeout_s)
        return
    mine = [part for part in (parts[i] for i in indexes) if part is not None]
    outcome = await backend.send(endpoint, merged_body(endpoint, bodies[indexes[0]], mine), timeout_s)
    if outcome.kind is OutcomeKind.HTTP_ERROR and not outcome.is_retryable:
        half = len(indexes) // 2
        await _send(backend, endpoint, bodies, parts, indexes[:half], timeout_s, outcomes)
        await _send(backend, endpoint, bodies, parts, indexes[half:], timeout_s, outcomes)
        return
    for index, line_outcome in zip(indexes, _split(endpoint, outcome, mine), strict=True):
        outcomes[index] = line_outcome


def _split(endpoint: str, outcome: Outcome, parts: Sequence[Part]) -> list[Outcome]:
    if outcome.kind is not OutcomeKind.SUCCESS or outcome.body is None:
        return [outcome] * len(parts)
    try:
        members = outcome.answer if outcome.answer is not None else rawjson.read_object(outcome.body)
        if members is None:
            raise SplitError("it is not a JSON object")
        answers = split_answer(endpoint, _readable(endpoint, members), parts, outcome.input_tokens)
    except (SplitError, rawjson.DecodeError) as exc:
        unreadable = Outcome(
            OutcomeKind.UNAVAILABLE,
            status_code=outcome.status_code,
            request_id=outcome.request_id,
            message=f"The backend's answer to {len(parts)} lines sent together could not be split: {exc}.",
        )
        return [unreadable] * len(parts)
    # One upstream request answered them all: its id is each line's, one made up for it where the engine sent none.
    request_id = outcome.request_id or ids.request_id()
    return [
        Outcome(
            OutcomeKind.SUCCESS,
            status_code=outcome.status_code,
            body=rawjson.encode(body),
            request_id=request_id,
            usage=Usage(tokens),
        )
        for body, tokens in answers
    ]


def _readable(endpoint: str, members: dict[str, Any]) -> dict[str, Any]:
    """The answer as split_answer reads it, parsed no deeper than that: its entries (for an indexed endpoint each
    an object whose `index` is parsed, the rest left as it came) and its usage. Everything else, an embedding's
    floats above all, stays unparsed and is written into each line's body as the engine sent it."""
    shape = SHAPES[endpoint]
    answer = dict(members)
    entries = members.get(shape.entries)
    if entries is not None:
        if shape.indexed:
            objects = rawjson.read_objects(entries)
            for entry in objects:
                if "index" in entry:
                    entry["index"] = rawjson.parse(entry["index"])
            answer[shape.entries] = objects
        else:
            answer[shape.entries] = rawjson.read_values(entries)
    if "usage" in members:
        answer["usage"] = rawjson.parse(members["usage"])
    return answer
