"""Comparing two runs of the same requests (domain.run_diff): matched by what they asked, not by custom_id."""

from __future__ import annotations

from typing import Any

import orjson

from backfill.domain.run_diff import answer_of, compare


def ask(custom_id: str, text: str, url: str = "/v1/chat/completions") -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def ok(custom_id: str, content: str, tokens: tuple[int, int] = (10, 2), run: str = "1") -> bytes:
    body = {
        "id": f"chatcmpl-{run}-{custom_id}",
        "created": int(run),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]},
    }
    response = {"status_code": 200, "request_id": f"req-{run}", "body": body}
    return orjson.dumps({"id": f"batch_req_{run}", "custom_id": custom_id, "response": response, "error": None})


def failed(custom_id: str, message: str = "boom") -> bytes:
    error = {"code": "backend_unavailable", "message": message}
    return orjson.dumps({"id": "batch_req_x", "custom_id": custom_id, "response": None, "error": error})


def test_lines_are_matched_by_request_body_whatever_their_custom_ids() -> None:
    inputs_a = [ask("a1", "one"), ask("a2", "two"), ask("a3", "three"), ask("a4", "four")]
    results_a = [ok("a1", "1"), ok("a2", "2"), ok("a3", "3"), failed("a4")]
    # B: fresh ids, another order, one request changed ("two" -> "deux"), "three" now fails, "four" now works
    inputs_b = [ask("b4", "four"), ask("b1", "one"), ask("b2", "deux"), ask("b3", "three")]
    results_b = [ok("b4", "4", run="2"), ok("b1", "1", (10, 3), run="2"), ok("b2", "2", run="2"), failed("b3")]

    diff = compare(inputs_a, results_a, inputs_b, results_b)

    assert (3, 1, 0, 1, 1, 0) == (
        diff.matched, diff.same, len(diff.changed), len(diff.new_failures), len(diff.fixed), diff.still_failing
    )  # fmt: skip
    assert (["a2"], ["b2"]) == (diff.only_in_a, diff.only_in_b)
    assert [("a3", "b3")] == [(a.custom_id, b.custom_id) for a, b in diff.new_failures]
    assert ((20, 4), (20, 5)) == (diff.tokens_a, diff.tokens_b)  # one/three/four matched; failed lines count 0


def test_a_changed_answer_is_reported_and_ids_and_timestamps_are_not_a_change() -> None:
    inputs = [ask("x", "hello"), ask("y", "again")]

    diff = compare(inputs, [ok("x", "hi", run="1"), ok("y", "same", run="1")], inputs,
                   [ok("x", "hey", run="2"), ok("y", "same", run="2")])  # fmt: skip

    assert 1 == diff.same
    assert [({"content": "hi", "tool_calls": None, "refusal": None}, {"content": "hey", "tool_calls": None,
            "refusal": None})] == [(a.output, b.output) for a, b in diff.changed]  # fmt: skip
    payload: dict[str, Any] = diff.to_json()
    assert ["x"] == [item["custom_id_b"] for item in payload["changed"]]


def test_repeated_requests_pair_up_in_order_and_embeddings_compare_vectors() -> None:
    inputs = [ask("e1", "same", "/v1/embeddings"), ask("e2", "same", "/v1/embeddings")]

    def vector(custom_id: str, values: list[float]) -> bytes:
        body = {"data": [{"embedding": values, "index": 0}], "usage": {"prompt_tokens": 2}}
        return orjson.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None})

    diff = compare(
        inputs, [vector("e1", [1.0]), vector("e2", [2.0])], inputs, [vector("e1", [1.0]), vector("e2", [2.5])]
    )

    assert (2, 1) == (diff.matched, diff.same)
    assert [[[2.0]], [[2.5]]] == [diff.changed[0][0].output, diff.changed[0][1].output]


def test_a_backend_error_line_is_a_failure_with_its_code() -> None:
    body = {"error": {"message": "bad request", "type": "invalid_request_error"}}
    line = orjson.dumps({"custom_id": "z", "response": {"status_code": 400, "body": body}, "error": None})

    answer = answer_of(line)

    assert (False, "400: bad request") == (answer.ok, answer.error)
