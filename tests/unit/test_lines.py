"""Splitting an input file into lines and validating them against SPEC §3."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from backfill.domain.batches import LineError
from backfill.domain.bodies import check_body
from backfill.domain.lines import (
    INVALID_JSON_MESSAGE,
    FileValidator,
    RawLine,
    ValidationLimits,
    ValidationResult,
    split_lines,
)

CHAT = "/v1/chat/completions"
MODEL = "m"


def request(custom_id: str = "r1", model: str | None = MODEL, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    line: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    line.update(overrides)
    return line


def without(key: str) -> dict[str, Any]:
    return {name: value for name, value in request().items() if name != key}


def with_body(**fields: Any) -> dict[str, Any]:
    line = request()
    return {**line, "body": {**line["body"], **fields}}


def jsonl(*lines: object) -> bytes:
    """Each item is a dict (dumped as JSON) or raw bytes (kept as is); one per line."""
    return b"".join((item if isinstance(item, bytes) else orjson.dumps(item)) + b"\n" for item in lines)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def validate(
    data: bytes,
    *,
    endpoint: str = CHAT,
    served: frozenset[str] = frozenset({MODEL}),
    limits: ValidationLimits | None = None,
) -> ValidationResult:
    limits = limits or ValidationLimits()
    validator = FileValidator(endpoint, lambda model: model in served, limits)
    for raw in split_lines(chunked(data, 7), limits.max_line_bytes):
        validator.feed(raw)
    return validator.finish()


def errors_of(result: ValidationResult) -> list[tuple[str, int | None]]:
    return [(error.code, error.line) for error in result.errors]


# --- split_lines -----------------------------------------------------------------------------------------


def test_lines_spanning_chunk_boundaries_are_joined_with_their_file_offsets() -> None:
    chunks = [b'{"a"', b":1}\n", b'{"b":22}\n{', b'"c"', b":3}\n"]

    actual = list(split_lines(chunks, max_line_bytes=100))

    expected = [
        RawLine(1, 0, 7, b'{"a":1}'),
        RawLine(2, 8, 8, b'{"b":22}'),
        RawLine(3, 17, 7, b'{"c":3}'),
    ]
    assert expected == actual


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_chunk_size_never_changes_the_lines(size: int) -> None:
    data = b'{"a":1}\n\n{"bb":[1,2,3]}\nlast line without newline'
    expected = list(split_lines([data], max_line_bytes=100))

    actual = list(split_lines(chunked(data, size), max_line_bytes=100))

    assert expected == actual
    assert [b'{"a":1}', b"", b'{"bb":[1,2,3]}', b"last line without newline"] == [line.data for line in actual]


def test_every_line_can_be_read_back_from_the_file_by_offset_and_length() -> None:
    data = b'{"a":1}\n{"b":2}\r\n\n{"c":3}'

    for line in split_lines(chunked(data, 3), max_line_bytes=100):
        assert line.data == data[line.offset : line.offset + line.length]


def test_final_line_without_newline_is_yielded() -> None:
    actual = list(split_lines([b'{"a":1}\n{"b":2}'], max_line_bytes=100))

    assert [RawLine(1, 0, 7, b'{"a":1}'), RawLine(2, 8, 7, b'{"b":2}')] == actual


def test_trailing_newline_adds_no_empty_line() -> None:
    assert [RawLine(1, 0, 3, b"abc")] == list(split_lines([b"abc\n"], max_line_bytes=100))


def test_empty_stream_has_no_lines() -> None:
    assert [] == list(split_lines([], max_line_bytes=100))
    assert [] == list(split_lines([b"", b""], max_line_bytes=100))


def test_oversize_line_has_no_data_but_its_true_length_and_the_next_line_is_intact() -> None:
    data = b"x" * 25 + b"\n" + b'{"ok":1}\n'

    actual = list(split_lines(chunked(data, 4), max_line_bytes=10))

    assert [RawLine(1, 0, 25, None), RawLine(2, 26, 8, b'{"ok":1}')] == actual


def test_line_of_exactly_the_limit_keeps_its_data() -> None:
    actual = list(split_lines(chunked(b"0123456789\n01234567890\n", 3), max_line_bytes=10))

    assert [RawLine(1, 0, 10, b"0123456789"), RawLine(2, 11, 11, None)] == actual


def test_oversize_final_line_without_newline_has_its_length() -> None:
    actual = list(split_lines(chunked(b"ok\n" + b"y" * 50, 8), max_line_bytes=10))

    assert [RawLine(1, 0, 2, b"ok"), RawLine(2, 3, 50, None)] == actual


def test_oversize_line_is_not_held_in_memory() -> None:
    chunk_bytes = 64 * 1024
    line_bytes = 16 * 1024 * 1024

    def chunks() -> Iterator[bytes]:
        for _ in range(line_bytes // chunk_bytes):
            yield bytes(chunk_bytes)  # a fresh object each time: holding them would show
        yield b"\n{}\n"

    tracemalloc.start()
    try:
        lines = list(split_lines(chunks(), max_line_bytes=1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert [RawLine(1, 0, line_bytes, None), RawLine(2, line_bytes + 1, 2, b"{}")] == lines
    assert peak < 8 * chunk_bytes


def test_crlf_lines_parse_and_crlf_blank_lines_are_blank() -> None:
    data = b'{"custom_id":"a"}\r\n\r\n{"custom_id":"b"}\r\n'

    lines = list(split_lines(chunked(data, 5), max_line_bytes=100))

    assert [1, 2, 3] == [line.number for line in lines]
    assert [{"custom_id": "a"}, {"custom_id": "b"}] == [
        orjson.loads(data[line.offset : line.offset + line.length]) for line in (lines[0], lines[2])
    ]
    assert lines[1].data is not None
    assert b"" == lines[1].data.strip()


def test_a_byte_order_mark_belongs_to_no_line_and_offsets_count_it() -> None:
    data = b"\xef\xbb\xbf" + jsonl({"custom_id": "a"}, {"custom_id": "b"})

    for size in (1, 2, 3, 5, len(data)):
        lines = list(split_lines(chunked(data, size), max_line_bytes=100))

        assert [{"custom_id": "a"}, {"custom_id": "b"}] == [
            orjson.loads(data[line.offset : line.offset + line.length]) for line in lines
        ]
        assert [b'{"custom_id":"a"}', b'{"custom_id":"b"}'] == [line.data for line in lines]


def test_a_byte_order_mark_later_in_the_file_is_kept() -> None:
    data = jsonl({"custom_id": "a"}) + b"\xef\xbb\xbf" + jsonl({"custom_id": "b"})

    lines = list(split_lines([data], max_line_bytes=100))

    assert b'\xef\xbb\xbf{"custom_id":"b"}' == lines[1].data


# --- FileValidator: valid files ------------------------------------------------------------------------------


def test_valid_file_yields_its_lines_and_model() -> None:
    data = jsonl(request("a"), request("b"), request("c"))

    result = validate(data)

    assert result.ok
    assert [] == result.errors
    assert MODEL == result.model
    assert [("a", 1), ("b", 2), ("c", 3)] == [(line.custom_id, line.number) for line in result.lines]
    for line in result.lines:
        assert orjson.loads(data[line.offset : line.offset + line.length])["custom_id"] == line.custom_id
    assert sum(line.est_prompt_tokens for line in result.lines) == result.est_prompt_tokens
    assert all(line.est_prompt_tokens >= 1 for line in result.lines)


def test_blank_lines_are_ignored_but_keep_line_numbers() -> None:
    data = b"\n" + jsonl(request("a")) + b"   \n\t\n" + jsonl(request("b")) + b"\n\n"

    result = validate(data)

    assert result.ok
    assert [("a", 2), ("b", 5)] == [(line.custom_id, line.number) for line in result.lines]


def test_crlf_file_is_valid() -> None:
    data = jsonl(request("a")).replace(b"\n", b"\r\n") + b"\r\n" + jsonl(request("b")).replace(b"\n", b"\r\n")

    result = validate(data)

    assert result.ok
    assert ["a", "b"] == [line.custom_id for line in result.lines]


# --- FileValidator: every SPEC §3 code --------------------------------------------------------------------


def test_a_file_that_starts_with_a_byte_order_mark_is_valid() -> None:
    result = validate(b"\xef\xbb\xbf" + jsonl(request("a"), request("b")))

    assert ([], ["a", "b"]) == (result.errors, [line.custom_id for line in result.lines])


def nested_line(depth: int) -> bytes:
    """A valid line whose body is `depth` levels deep (the body object, then lists in lists)."""
    return orjson.dumps(request("deep"))[:-2] + b', "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}}"


@pytest.mark.parametrize("depth", [253, 254])
def test_a_body_nested_as_deep_as_can_be_sent_is_valid(depth: int) -> None:
    result = validate(jsonl(nested_line(depth)))

    assert [] == result.errors


@pytest.mark.parametrize("depth", [255, 300, 1000])
def test_a_body_nested_deeper_than_can_be_sent_is_invalid_on_its_line(depth: int) -> None:
    result = validate(jsonl(request("a"), nested_line(depth)))

    assert [("invalid_request", 2, "body")] == [(e.code, e.line, e.param) for e in result.errors]
    assert "254 levels" in result.errors[0].message


def test_unparseable_line_is_invalid_json_line() -> None:
    result = validate(jsonl(request("a"), b'{"custom_id": "b",', request("c")))

    assert not result.ok
    assert [LineError("invalid_json_line", INVALID_JSON_MESSAGE, 2)] == result.errors
    assert [] == result.lines


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        pytest.param([1, 2], "invalid_request", None, id="not-an-object"),
        pytest.param("text", "invalid_request", None, id="a-string"),
        pytest.param(without("custom_id"), "missing_required_parameter", "custom_id", id="no-custom_id"),
        pytest.param(without("method"), "missing_required_parameter", "method", id="no-method"),
        pytest.param(without("url"), "missing_required_parameter", "url", id="no-url"),
        pytest.param(without("body"), "missing_required_parameter", "body", id="no-body"),
        pytest.param(request(custom_id=7), "invalid_request", "custom_id", id="custom_id-not-a-string"),
        pytest.param(request(custom_id=""), "invalid_request", "custom_id", id="custom_id-empty"),
        pytest.param(request(url=["x"]), "invalid_request", "url", id="url-not-a-string"),
        pytest.param(request(body="{}"), "invalid_request", "body", id="body-a-string"),
        pytest.param(request(method="GET"), "invalid_request", "method", id="method-not-post"),
        pytest.param(request(model=None), "invalid_request", "body.model", id="no-model"),
        pytest.param(request(model=5), "invalid_request", "body.model", id="model-not-a-string"),
        pytest.param(request(body={"model": MODEL}), "invalid_request", "body.messages", id="no-messages"),
        pytest.param(
            request(body={"model": MODEL, "messages": "hi"}), "invalid_request", "body.messages", id="messages-text"
        ),
        pytest.param(
            request(body={"model": MODEL, "messages": []}), "invalid_request", "body.messages", id="messages-empty"
        ),
        pytest.param(with_body(stream=True), "streaming_unsupported", "body.stream", id="stream"),
        pytest.param(with_body(stream="yes"), "invalid_request", "body.stream", id="stream-not-a-boolean"),
        pytest.param(with_body(max_tokens="10"), "invalid_request", "body.max_tokens", id="max_tokens-text"),
        pytest.param(with_body(max_tokens=True), "invalid_request", "body.max_tokens", id="max_tokens-boolean"),
        pytest.param(with_body(temperature="hot"), "invalid_request", "body.temperature", id="temperature-text"),
        pytest.param(with_body(stop=[1]), "invalid_request", "body.stop", id="stop-numbers"),
        pytest.param(request(url="/v1/embeddings"), "invalid_url", "url", id="url-of-another-endpoint"),
    ],
)
def test_malformed_request_fails_on_its_line_with_its_code(line: object, code: str, param: str | None) -> None:
    result = validate(jsonl(request("a"), line))

    assert [(code, 2)] == errors_of(result)
    assert param == result.errors[0].param


def test_missing_fields_get_the_messages_openai_sends() -> None:
    data = jsonl(without("custom_id"), request("b", model=None), request("c", body={"model": MODEL}))

    result = validate(data)

    assert [
        ("missing_required_parameter", "Missing required parameter: 'custom_id'.", 1, "custom_id"),
        ("invalid_request", "Model parameter is required.", 2, "body.model"),
        ("invalid_request", "Messages parameter is required.", 3, "body.messages"),
    ] == [(error.code, error.message, error.line, error.param) for error in result.errors]


@pytest.mark.parametrize(
    ("endpoint", "field", "name"),
    [
        ("/v1/chat/completions", "messages", "Chat Completions"),
        ("/v1/completions", "prompt", "Completions"),
        ("/v1/embeddings", "input", "Embeddings"),
        ("/v1/responses", "input", "Responses"),
        ("/v1/moderations", "input", "Moderations"),
    ],
)
def test_each_endpoint_requires_its_own_body_field_and_refuses_streaming(endpoint: str, field: str, name: str) -> None:
    value: object = [{"role": "user", "content": "hi"}] if field == "messages" else "text"

    def line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": {"model": MODEL, **body}}

    result = validate(
        jsonl(line("ok", {field: value}), line("missing", {}), line("streamed", {field: value, "stream": True})),
        endpoint=endpoint,
    )

    assert [
        ("invalid_request", f"{field.capitalize()} parameter is required.", 2, f"body.{field}"),
        ("streaming_unsupported", f"{name}: Streaming is not supported in the Batch API.", 3, "body.stream"),
    ] == [(error.code, error.message, error.line, error.param) for error in result.errors]


def test_of_several_wrong_fields_the_first_in_the_checks_order_is_named_whatever_the_body_s_order() -> None:
    # The rerank endpoint's own `top_n` is checked before the common fields, `stream` before `temperature`.
    rerank = {"model": MODEL, "query": "q", "documents": ["d"]}
    assert "body.top_n" == problem_param("/v1/rerank", {**rerank, "temperature": "hot", "top_n": "2"})
    assert "body.stream" == problem_param("/v1/chat/completions", with_body(temperature="hot", stream="yes")["body"])
    assert "body.temperature" == problem_param("/v1/chat/completions", with_body(temperature="hot", seed=1)["body"])
    assert problem_param("/v1/chat/completions", with_body(temperature=None, seed=None)["body"]) is None


def problem_param(endpoint: str, body: dict[str, Any]) -> str | None:
    problem = check_body(endpoint, body)
    return None if problem is None else problem.param


def test_stream_false_is_allowed() -> None:
    assert validate(jsonl(with_body(stream=False))).ok


def test_repeated_custom_id_is_duplicate_custom_id() -> None:
    result = validate(jsonl(request("a"), request("b"), request("a")))

    assert [("duplicate_custom_id", 3)] == errors_of(result)
    assert "custom_id" == result.errors[0].param


def test_url_other_than_the_batch_endpoint_is_invalid_url() -> None:
    result = validate(jsonl(request("a"), request("b", url="/v1/embeddings")))

    assert [("invalid_url", 2)] == errors_of(result)


def test_second_model_is_model_mismatch() -> None:
    data = jsonl(request("a"), request("b", model="other"), request("c"))

    result = validate(data, served=frozenset({MODEL, "other"}))

    assert [("model_mismatch", 2)] == errors_of(result)
    assert MODEL == result.model


def test_model_no_backend_serves_is_model_not_found_on_every_line() -> None:
    result = validate(jsonl(request("a", model="nobody-serves-me"), request("b", model="nobody-serves-me")))

    assert [("model_not_found", 1), ("model_not_found", 2)] == errors_of(result)
    assert "body.model" == result.errors[1].param
    assert "nobody-serves-me" == result.model


def test_more_lines_than_the_limit_is_too_many_tasks_once() -> None:
    data = jsonl(*(request(f"r{i}") for i in range(5)))

    result = validate(data, limits=ValidationLimits(max_lines=3))

    assert [("too_many_tasks", None)] == errors_of(result)
    assert 1 == result.error_count
    assert [] == result.lines


def test_exactly_the_line_limit_is_accepted() -> None:
    result = validate(jsonl(*(request(f"r{i}") for i in range(3))), limits=ValidationLimits(max_lines=3))

    assert result.ok
    assert 3 == len(result.lines)


def test_too_many_embedding_inputs_is_too_many_tasks() -> None:
    def embedding(custom_id: str, inputs: object) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": inputs},
        }

    data = jsonl(embedding("a", ["x", "y"]), embedding("b", [1, 2, 3]), embedding("c", "z"), embedding("d", ["w"]))

    result = validate(data, endpoint="/v1/embeddings", limits=ValidationLimits(max_embedding_inputs=4))

    # 2 inputs, then token ids (one input), then a string (one input): 4; the fifth is over.
    assert [("too_many_tasks", 4)] == errors_of(result)


@pytest.mark.parametrize("data", [b"", b"\n", b"\n  \n\r\n"], ids=["empty", "newline", "blank-lines"])
def test_file_without_requests_is_empty_file(data: bytes) -> None:
    result = validate(data)

    assert [("empty_file", None)] == errors_of(result)


def test_oversize_line_is_invalid_request_on_its_line() -> None:
    big = request("b", body={"model": MODEL, "input": "x" * 200})

    result = validate(jsonl(request("a"), big, request("c")), limits=ValidationLimits(max_line_bytes=150))

    assert [("invalid_request", 2)] == errors_of(result)
    assert str(len(orjson.dumps(big))) in result.errors[0].message


def test_every_problem_is_reported_with_its_line() -> None:
    data = jsonl(
        request("a"),
        b"not json",
        request("a"),
        request("b", url="/v1/responses"),
        request("c", model="other"),
        request("d", method="PUT"),
    )

    result = validate(data, served=frozenset({MODEL, "other"}))

    expected = [
        ("invalid_json_line", 2),
        ("duplicate_custom_id", 3),
        ("invalid_url", 4),
        ("model_mismatch", 5),
        ("invalid_request", 6),
    ]
    assert expected == errors_of(result)
    assert 5 == result.error_count


def test_reported_errors_are_capped_but_all_are_counted() -> None:
    data = jsonl(*([b"garbage"] * 10))

    result = validate(data, limits=ValidationLimits(max_reported_errors=3))

    assert [("invalid_json_line", 1), ("invalid_json_line", 2), ("invalid_json_line", 3)] == errors_of(result)
    assert 10 == result.error_count
    assert not result.ok


def test_line_error_is_reported_in_the_batch_errors_shape() -> None:
    error = LineError("duplicate_custom_id", "dup", 3, "custom_id")

    assert {"code": "duplicate_custom_id", "message": "dup", "param": "custom_id", "line": 3} == error.to_dict()
