"""Splitting a coalesced answer (dispatch/coalesced.py) passes each entry's values through as the engine wrote them:
an embedding's floats are checked, never parsed and formatted again."""

from __future__ import annotations

import asyncio

import orjson

from backfill.dispatch.coalesced import send_together
from backfill.domain.outcomes import Outcome, OutcomeKind

EMBEDDINGS = "/v1/embeddings"
# Out of input order, floats in spellings a formatter would change, spaces between tokens.
ANSWER = (
    b'{"object": "list", "data": [{"object": "embedding", "embedding": [0.10, -2.50E-1], "index": 1},'
    b' {"object": "embedding", "embedding": [1e-7,3], "index": 0, "extra": {"kept": true}}],'
    b' "model": "m", "usage": {"prompt_tokens": 10, "total_tokens": 10}}'
)


class OneAnswer:
    """A backend that answers every request with `body`."""

    def __init__(self, body: bytes, request_id: str | None = "req-1") -> None:
        self.body = body
        self.request_id = request_id
        self.sent: list[bytes] = []

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        self.sent.append(body)
        return Outcome(OutcomeKind.SUCCESS, status_code=200, body=self.body, request_id=self.request_id)


def test_each_line_gets_its_entry_with_the_engine_s_own_bytes() -> None:
    engine = OneAnswer(ANSWER)
    bodies = [{"model": "m", "input": "first text"}, {"model": "m", "input": "second text"}]

    outcomes = asyncio.run(send_together(engine, EMBEDDINGS, bodies, 30.0, 256))  # type: ignore[arg-type]

    assert 1 == len(engine.sent)
    assert [OutcomeKind.SUCCESS] * 2 == [outcome.kind for outcome in outcomes]
    first, second = (outcome.body or b"" for outcome in outcomes)
    assert b'"embedding":[1e-7,3],"index":0,"extra":{"kept": true}' in first  # the entry answering input 0
    assert b'"embedding":[0.10, -2.50E-1],"index":0' in second  # renumbered from 0 for its line
    assert b"\n" not in first + second
    assert [1e-7, 3] == orjson.loads(first)["data"][0]["embedding"]
    assert 10 == sum(orjson.loads(body)["usage"]["prompt_tokens"] for body in (first, second))
    assert 10 == sum(outcome.usage.input_tokens for outcome in outcomes)
    assert ["req-1", "req-1"] == [outcome.request_id for outcome in outcomes]


def test_lines_answered_by_one_request_without_an_id_share_one_made_up_for_it() -> None:
    bodies = [{"model": "m", "input": "first text"}, {"model": "m", "input": "second text"}]

    first = asyncio.run(send_together(OneAnswer(ANSWER, None), EMBEDDINGS, bodies, 30.0, 256))  # type: ignore[arg-type]
    again = asyncio.run(send_together(OneAnswer(ANSWER, None), EMBEDDINGS, bodies, 30.0, 256))  # type: ignore[arg-type]

    ids = {outcome.request_id for outcome in first}
    assert 1 == len(ids)
    assert all(request_id and request_id.startswith("req_") for request_id in ids)
    assert ids.isdisjoint(outcome.request_id for outcome in again)


def test_an_answer_whose_entries_are_not_objects_fails_every_line_as_unsplittable() -> None:
    engine = OneAnswer(b'{"data": [1, 2], "usage": {"prompt_tokens": 2}}')
    bodies = [{"model": "m", "input": "a"}, {"model": "m", "input": "b"}]

    outcomes = asyncio.run(send_together(engine, EMBEDDINGS, bodies, 30.0, 256))  # type: ignore[arg-type]

    assert [OutcomeKind.UNAVAILABLE] * 2 == [outcome.kind for outcome in outcomes]
    assert "could not be split" in outcomes[0].message
