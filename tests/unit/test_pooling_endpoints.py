"""vLLM's pooling APIs as batch endpoints: classify and score lines merged and split back, rerank lines alone, and
each line's body checked before it is accepted."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from backfill.dispatch.coalesced import send_together
from backfill.domain.batches import ENDPOINTS
from backfill.domain.bodies import check_body
from backfill.domain.coalescing import CLASSIFY, COALESCED_ENDPOINTS, SCORE, merged_body, part_of, plan_requests
from backfill.domain.coalescing import split_answer as split
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.testing.pooling import class_probs, classify_answer, pair_score, rerank_answer, score_answer


def words(text: str) -> int:
    return len(text.split())


def test_the_pooling_endpoints_are_batch_endpoints_and_rerank_never_merges() -> None:
    assert {"/classify", "/v1/score", "/score", "/v1/rerank", "/rerank"} <= ENDPOINTS
    assert {"/classify", "/v1/score", "/score"} <= COALESCED_ENDPOINTS
    assert not {"/v1/rerank", "/rerank"} & COALESCED_ENDPOINTS


def test_classify_lines_merge_like_embeddings_text_and_token_ids_apart() -> None:
    bodies = [{"model": "c", "input": x} for x in ("a", ["b", "c"], [1, 2], "d")]
    bodies.append({"model": "c", "messages": [{"role": "user", "content": "e"}]})  # chat form: alone
    parts = [part_of(CLASSIFY, b) for b in bodies]
    assert [[0, 1, 3], [2], [4]] == plan_requests(parts, max_inputs=8)
    merged = orjson.loads(merged_body(CLASSIFY, bodies[0], [p for p in (parts[0], parts[1], parts[3]) if p]))
    assert {"model": "c", "input": ["a", "b", "c", "d"]} == merged


def test_a_classify_answer_is_split_per_line_indexed_from_zero_with_usage_summing_to_the_engine_s() -> None:
    bodies = [{"model": "c", "input": "one two"}, {"model": "c", "input": ["three", "four five six"]}]
    parts = [p for p in (part_of(CLASSIFY, b) for b in bodies) if p]
    answer = classify_answer({"input": ["one two", "three", "four five six"]}, "c", words)
    answer["data"].reverse()  # an engine may answer out of order: the index says which is which
    (first, first_tokens), (second, second_tokens) = split(CLASSIFY, answer, parts)
    assert [(0, class_probs("one two"))] == [(e["index"], e["probs"]) for e in first["data"]]
    assert [(0, class_probs("three")), (1, class_probs("four five six"))] == [
        (e["index"], e["probs"]) for e in second["data"]
    ]
    assert 6 == first_tokens + second_tokens == answer["usage"]["prompt_tokens"]
    assert first_tokens == first["usage"]["prompt_tokens"] == first["usage"]["total_tokens"]
    assert ("list", "c", answer["id"]) == (first["object"], first["model"], first["id"])


def score_body(text_1: Any, text_2: Any, **params: Any) -> dict[str, Any]:
    return {"model": "r", "text_1": text_1, "text_2": text_2, **params}


def test_score_lines_merge_only_on_one_shared_text_1_string() -> None:
    bodies = [
        score_body("q", "a"),
        score_body("q", ["b", "c"]),
        score_body("other", "d"),  # another query: another request
        score_body(["q"], "e"),  # text_1 an array: alone, as it came
        {"model": "r", "queries": "q", "documents": "f"},  # vLLM's other spelling: alone
        score_body("q", "g"),
    ]
    parts = [part_of(SCORE, b) for b in bodies]
    assert [[0, 1, 5], [2], [3], [4]] == plan_requests(parts, max_inputs=8)
    merged = orjson.loads(merged_body(SCORE, bodies[0], [p for p in (parts[0], parts[1], parts[5]) if p]))
    assert score_body("q", ["a", "b", "c", "g"]) == merged


def test_a_score_answer_gives_each_line_the_scores_of_its_own_pairs() -> None:
    bodies = [score_body("the query", "doc one"), score_body("the query", ["doc two", "doc three"])]
    parts = [p for p in (part_of(SCORE, b) for b in bodies) if p]
    answer = score_answer(score_body("the query", ["doc one", "doc two", "doc three"]), "r", words)
    (first, first_tokens), (second, second_tokens) = split(SCORE, answer, parts)
    assert [{"index": 0, "object": "score", "score": pair_score("the query", "doc one")}] == first["data"]
    assert [pair_score("the query", "doc two"), pair_score("the query", "doc three")] == [
        e["score"] for e in second["data"]
    ]
    assert [0, 1] == [e["index"] for e in second["data"]]
    assert answer["usage"]["prompt_tokens"] == first_tokens + second_tokens


class PoolingEngine:
    """Answers classify as the fake upstream does, refusing any request holding the input "bad"."""

    name = "p"
    models = frozenset({"c"})
    max_concurrency = 4

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, endpoint: str, raw: bytes, timeout_s: float) -> Outcome:
        request = orjson.loads(raw)
        self.sent.append(request["input"])
        if "bad" in request["input"]:
            return Outcome(OutcomeKind.HTTP_ERROR, 400, body=b'{"error":{"message":"bad input"}}')
        return Outcome(OutcomeKind.SUCCESS, 200, body=orjson.dumps(classify_answer(request, "c", words)))

    async def close(self) -> None:
        return None


def test_classify_lines_go_in_one_request_and_a_refused_one_fails_alone() -> None:
    engine = PoolingEngine()
    bodies = [{"model": "c", "input": text} for text in ("a", "b", "bad", "c")]
    outcomes = asyncio.run(send_together(engine, CLASSIFY, bodies, 5.0, max_inputs=8))
    assert [200, 200, 400, 200] == [outcome.status_code for outcome in outcomes]
    assert ["a", "b", "bad", "c"] == engine.sent[0]
    answer = orjson.loads(outcomes[3].body or b"{}")
    assert [{"index": 0, "label": answer["data"][0]["label"], "probs": class_probs("c"), "num_classes": 2}] == (
        answer["data"]
    )


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("/classify", {"model": "c"}, ("Input parameter is required.", "body.input")),
        (
            "/classify",
            {"model": "c", "input": 3},
            ("Invalid 'body.input': expected a string or an array, but got an integer instead.", "body.input"),
        ),
        (
            "/classify",
            {"model": "c", "messages": []},
            ("Invalid 'body.messages': expected a non-empty array, but got an array instead.", "body.messages"),
        ),
        ("/v1/score", {"model": "r", "text_1": "q"}, ("Text_2 parameter is required.", "body.text_2")),
        (
            "/score",
            {"model": "r", "text_1": 1, "text_2": "d"},
            (
                "Invalid 'body.text_1': expected a string, an array or an object, but got an integer instead.",
                "body.text_1",
            ),
        ),
        ("/v1/score", {"model": "r", "queries": "q"}, ("Documents parameter is required.", "body.documents")),
        ("/v1/rerank", {"model": "r", "documents": ["d"]}, ("Query parameter is required.", "body.query")),
        ("/rerank", {"model": "r", "query": "q"}, ("Documents parameter is required.", "body.documents")),
        (
            "/v1/rerank",
            {"model": "r", "query": "q", "documents": ["d"], "top_n": "2"},
            ("Invalid type for 'body.top_n': expected an integer, but got a string instead.", "body.top_n"),
        ),
    ],
)
def test_a_pooling_line_without_what_its_endpoint_needs_gets_its_own_error(
    endpoint: str, body: dict[str, Any], expected: tuple[str, str]
) -> None:
    problem = check_body(endpoint, body)
    assert problem is not None
    assert ("invalid_request", *expected) == (problem.code, problem.message, problem.param)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/classify", {"model": "c", "input": ["a", "b"]}),
        ("/classify", {"model": "c", "messages": [{"role": "user", "content": "a"}]}),
        ("/v1/score", {"model": "r", "text_1": "q", "text_2": ["a", "b"]}),
        ("/score", {"model": "r", "queries": ["q"], "items": ["a"]}),
        ("/v1/score", {"model": "r", "data_1": "q", "data_2": "a"}),
        ("/v1/rerank", {"model": "r", "query": "q", "documents": ["a", "b"], "top_n": 1}),
    ],
)
def test_well_formed_pooling_lines_pass(endpoint: str, body: dict[str, Any]) -> None:
    assert check_body(endpoint, body) is None


def test_rerank_answers_the_top_n_documents_most_relevant_first() -> None:
    answer = rerank_answer({"query": "q", "documents": ["a", "b", "c"], "top_n": 2}, "r", words)
    scores = sorted(((pair_score("q", d), i, d) for i, d in enumerate("abc")), reverse=True)[:2]
    assert [(i, {"text": d}, s) for s, i, d in scores] == [
        (r["index"], r["document"], r["relevance_score"]) for r in answer["results"]
    ]
    assert {"prompt_tokens": 6, "total_tokens": 6} == answer["usage"]
