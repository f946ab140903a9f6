"""Embeddings and moderations lines merged into one request and split back: grouping, splitting, usage, refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from backfill.core.pool import Pool, Start
from backfill.dispatch.coalesced import send_together
from backfill.domain.coalescing import (
    EMBEDDINGS,
    MODERATIONS,
    apportion,
    estimate_text_tokens,
    merged_body,
    part_of,
    plan_requests,
    split_answer,
)
from backfill.domain.leases import DispatchBatch, LeasedLine
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from tests.unit.test_pools import Endpoint, batch, lines


def body(text: Any, **params: Any) -> dict[str, Any]:
    return {"model": "e5", "input": text, **params}


def test_lines_with_equal_parameters_merge_and_others_go_their_own_way() -> None:
    parts = [
        part_of(EMBEDDINGS, body("a")),
        part_of(EMBEDDINGS, body("b", dimensions=64)),
        part_of(EMBEDDINGS, body(["c", "d"])),
        part_of(EMBEDDINGS, body([1, 2, 3])),  # token ids: another kind of input
        part_of(EMBEDDINGS, body([])),  # nothing to merge
        part_of(EMBEDDINGS, body([[4], [5, 6]])),
    ]
    assert [[0, 2], [1], [3, 5], [4]] == plan_requests(parts, max_inputs=8)


def test_a_request_holds_at_most_max_inputs_inputs() -> None:
    parts = [part_of(EMBEDDINGS, body(text)) for text in ("a", "b", "c")] + [part_of(EMBEDDINGS, body(["x"] * 5))]
    assert [[0, 1], [2], [3]] == plan_requests(parts, max_inputs=2)


def test_moderations_merge_text_only() -> None:
    assert part_of(MODERATIONS, body("a")) is not None
    assert part_of(MODERATIONS, body([{"type": "image_url", "image_url": {"url": "u"}}])) is None
    assert part_of(MODERATIONS, body([1, 2])) is None


def test_the_merged_body_carries_every_line_s_inputs_in_order() -> None:
    parts = [part_of(EMBEDDINGS, body("a")), part_of(EMBEDDINGS, body(["b", "c"]))]
    merged = orjson.loads(merged_body(EMBEDDINGS, body("a", user="u"), [p for p in parts if p is not None]))
    assert {"model": "e5", "input": ["a", "b", "c"], "user": "u"} == merged


def test_a_token_array_line_stays_one_input() -> None:
    parts = [part_of(EMBEDDINGS, body([1, 2])), part_of(EMBEDDINGS, body([3]))]
    assert [[1, 2], [3]] == orjson.loads(merged_body(EMBEDDINGS, body([1, 2]), [p for p in parts if p is not None]))[
        "input"
    ]


def test_apportioned_shares_sum_to_the_total_and_follow_the_weights() -> None:
    assert [3, 7] == apportion(10, [30, 70])
    assert [4, 3, 3] == apportion(10, [1, 1, 1])
    assert [0, 0] == apportion(0, [5, 5])
    assert [1, 1] == apportion(2, [0, 0])


def test_text_estimate_is_a_quarter_token_a_byte_at_least_one() -> None:
    assert (1, 1, 3) == (estimate_text_tokens(""), estimate_text_tokens("abcd"), estimate_text_tokens("é" * 5))


def embeddings_answer(count: int, prompt_tokens: int, *, reverse: bool = False) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": [float(i)]} for i in range(count)]
    return {
        "object": "list",
        "data": data[::-1] if reverse else data,
        "model": "e5",
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def test_each_line_gets_its_vectors_indexed_from_zero_and_a_share_of_the_usage() -> None:
    parts = [p for p in (part_of(EMBEDDINGS, body("aaaa")), part_of(EMBEDDINGS, body(["bbbbbbbb", "cccc"]))) if p]
    (first, first_tokens), (second, second_tokens) = split_answer(EMBEDDINGS, embeddings_answer(3, 9), parts)
    assert [{"object": "embedding", "index": 0, "embedding": [0.0]}] == first["data"]
    assert [[1.0], [2.0]] == [entry["embedding"] for entry in second["data"]]
    assert [0, 1] == [entry["index"] for entry in second["data"]]
    assert (2, 7) == (first_tokens, second_tokens)  # weights 1 and 3: 9 shared out, no token lost
    assert {"prompt_tokens": 7, "total_tokens": 7} == second["usage"]
    assert "e5" == second["model"]


def test_an_answer_out_of_order_is_put_back_in_input_order() -> None:
    parts = [p for p in (part_of(EMBEDDINGS, body("a")), part_of(EMBEDDINGS, body("b"))) if p]
    answers = split_answer(EMBEDDINGS, embeddings_answer(2, 2, reverse=True), parts)
    assert [[0.0], [1.0]] == [answer["data"][0]["embedding"] for answer, _ in answers]


def test_moderation_results_are_sliced_per_line() -> None:
    parts = [p for p in (part_of(MODERATIONS, body("a")), part_of(MODERATIONS, body(["b", "c"]))) if p]
    answer = {"id": "modr-1", "model": "m", "results": [{"flagged": False}, {"flagged": True}, {"flagged": False}]}
    (first, _), (second, _) = split_answer(MODERATIONS, answer, parts)
    assert ([{"flagged": False}], "modr-1") == (first["results"], first["id"])
    assert [{"flagged": True}, {"flagged": False}] == second["results"]


class ScriptedBackend:
    """Answers embeddings like an engine, refusing any request with an input that says "bad"."""

    name = "e"
    models = frozenset({"e5"})
    max_concurrency = 4

    def __init__(self, answer: Outcome | None = None) -> None:
        self.sent: list[list[Any]] = []
        self.answer = answer

    async def send(self, endpoint: str, raw: bytes, timeout_s: float) -> Outcome:
        inputs = orjson.loads(raw)["input"]
        items = inputs if isinstance(inputs, list) else [inputs]
        self.sent.append(items)
        if self.answer is not None:
            return self.answer
        if "bad" in items:
            return Outcome(OutcomeKind.HTTP_ERROR, 400, body=b'{"error":{"message":"bad input"}}')
        tokens = sum(len(str(item)) for item in items)
        return Outcome(OutcomeKind.SUCCESS, 200, body=orjson.dumps(embeddings_answer(len(items), tokens)))

    async def close(self) -> None:
        return None


def test_one_request_carries_many_lines_and_usage_sums_to_what_the_engine_reported() -> None:
    backend = ScriptedBackend()
    bodies = [body(f"text {i}") for i in range(10)]
    outcomes = asyncio.run(send_together(backend, EMBEDDINGS, bodies, 5.0, max_inputs=8))
    assert [8, 2] == [len(items) for items in backend.sent]
    assert {OutcomeKind.SUCCESS} == {outcome.kind for outcome in outcomes}
    assert sum(len(f"text {i}") for i in range(10)) == sum(outcome.usage.input_tokens for outcome in outcomes)


def test_a_line_the_engine_refuses_fails_alone() -> None:
    backend = ScriptedBackend()
    bodies = [body("a"), body("b"), body("bad"), body("c"), body("d")]
    outcomes = asyncio.run(send_together(backend, EMBEDDINGS, bodies, 5.0, max_inputs=8))
    assert [200, 200, 400, 200, 200] == [outcome.status_code for outcome in outcomes]
    assert 0 == orjson.loads(outcomes[3].body or b"{}")["data"][0]["index"]
    assert ["bad"] in backend.sent  # narrowed down to the line itself, which got the engine's own answer


def test_an_outage_is_every_line_s_outcome_unchanged() -> None:
    down = Outcome(OutcomeKind.UNAVAILABLE, message="no", unreachable=True)
    outcomes = asyncio.run(send_together(ScriptedBackend(down), EMBEDDINGS, [body("a"), body("b")], 5.0, 8))
    assert [down, down] == outcomes


def test_an_answer_that_cannot_be_split_is_no_line_s_success() -> None:
    short = Outcome(OutcomeKind.SUCCESS, 200, body=orjson.dumps(embeddings_answer(1, 1)))
    outcomes = asyncio.run(send_together(ScriptedBackend(short), EMBEDDINGS, [body("a"), body("b")], 5.0, 8))
    assert {OutcomeKind.UNAVAILABLE} == {outcome.kind for outcome in outcomes}


def embeddings_batch(batch_id: str = "b1") -> DispatchBatch:
    return DispatchBatch(batch_id, "t", "m", EMBEDDINGS, 10_000, "k", 0, 0, 1.0, 100, 1000, 0, 100)


def short_lines(count: int, tokens: int = 10) -> list[LeasedLine]:
    return [LeasedLine(i + 1, "b1", i + 1, f"c{i}", 0, 1, 0, 1, tokens) for i in range(count)]


def test_the_pool_starts_an_embeddings_request_of_several_lines_in_one_slot() -> None:
    pool = Pool.build([Endpoint("a", 2)], {})
    pool.add(embeddings_batch(), short_lines(40))
    first = pool.next_start(0.0)
    assert isinstance(first, list)
    assert 32 == len(first)  # the default size of a request to an in-process engine
    assert {2} == {start.request for start in first}  # named after its first line (id 1)
    assert 1 == pool.limits["a"].in_flight


def test_the_token_budget_bounds_a_request() -> None:
    pool = Pool.build([Endpoint("a", 2)], {})
    pool.request_size["a"] = (32, 100)
    pool.add(embeddings_batch(), short_lines(40, tokens=30))
    starts = pool.next_start(0.0)
    assert isinstance(starts, list)
    assert 3 == len(starts)


def test_the_slot_is_freed_when_the_last_line_of_the_request_leaves() -> None:
    pool = Pool.build([Endpoint("a", 1)], {})
    pool.add(embeddings_batch(), short_lines(3))
    starts = pool.next_start(0.0)
    assert isinstance(starts, list)
    answer = Outcome(OutcomeKind.SUCCESS, 200, usage=Usage(5))
    pool.finish(starts[0], 1.0, 1.0, answer)
    pool.release(starts[1])  # one aborted alone
    assert 1 == pool.limits["a"].in_flight
    pool.finish(starts[2], 1.0, 1.0, answer)
    assert (0, {}, {}) == (pool.limits["a"].in_flight, pool.requests, pool.tenant_in_flight)


def test_chat_lines_still_start_one_by_one() -> None:
    pool = Pool.build([Endpoint("a", 4)], {})
    pool.add(batch("b1", "t"), lines("b1", 5))
    starts = pool.next_start(0.0)
    assert isinstance(starts, list)
    assert [(1, 0)] == [(start.line.id, start.request) for start in starts if isinstance(start, Start)]


def test_an_embeddings_batch_leases_enough_lines_to_fill_its_requests() -> None:
    pool = Pool.build([Endpoint("a", 2)], {})
    assert 2 * 2 * 32 == pool.lease_wanted("b1", 1, pool.lines_per_request(EMBEDDINGS))
    assert 4 == pool.lease_wanted("b1", 1, pool.lines_per_request("/v1/chat/completions"))


def test_tokens_the_backend_counted_per_input_share_the_usage_out() -> None:
    parts = [p for p in (part_of(EMBEDDINGS, body("aaaa")), part_of(EMBEDDINGS, body(["b", "c"]))) if p]
    answers = split_answer(EMBEDDINGS, embeddings_answer(3, 10), parts, input_tokens=(6, 2, 2))
    assert [6, 4] == [tokens for _, tokens in answers]
