"""Content validation and create-time checks of the Batches API (SPEC §3), with the openai SDK.

Problems with the create request itself are answered at once (400/404); problems with the file's content never
fail the create call: the batch turns `failed` with line-numbered `errors` and nothing else to show.
"""

from __future__ import annotations

import io
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import psycopg
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.helpers import chat_line, counts, jsonl, read_jsonl, wait_for, wait_terminal
from tests.support.processes import Server, Upstream

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
INVALID_JSON_MESSAGE = "This line is not parseable as valid JSON."
# The limits of the shared server, small so that tests can cross them with a handful of lines.
MAX_LINES = 8
MAX_LINE_BYTES = 4096
MAX_EMBEDDING_INPUTS = 4
MAX_REPORTED_ERRORS = 5


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> Server:
    return start_module_server(
        max_lines=MAX_LINES,
        max_line_bytes=MAX_LINE_BYTES,
        max_embedding_inputs=MAX_EMBEDDING_INPUTS,
        max_reported_errors=MAX_REPORTED_ERRORS,
    )


@pytest.fixture
def client(server: Server) -> Iterator[OpenAI]:
    with client_for(server) as session:
        yield session


def ok(custom_id: str) -> bytes:
    return orjson.dumps(chat_line(custom_id, f"valid line {custom_id}"))


def changed(name: str, /, **fields: Any) -> bytes:
    """A chat line with top-level fields replaced; a field given as `...` is left out."""
    line = {**chat_line(name, f"line {name}"), **fields}
    return orjson.dumps({key: value for key, value in line.items() if value is not ...})


def with_body(name: str, /, **body: Any) -> bytes:
    """A chat line whose body gets extra or replaced fields; a field given as `...` is left out."""
    line = chat_line(name, f"line {name}")
    merged = {**line["body"], **body}  # type: ignore[dict-item]
    return orjson.dumps({**line, "body": {key: value for key, value in merged.items() if value is not ...}})


def embedding_line(custom_id: str, inputs: list[str]) -> bytes:
    return orjson.dumps(
        {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS, "body": {"model": MODEL, "input": inputs}}
    )


def run_batch(client: OpenAI, lines: list[bytes], endpoint: str = CHAT) -> Batch:
    """Upload the raw lines (one per element, newline-terminated), create a batch over them, wait for its end."""
    data = b"".join(line + b"\n" for line in lines)
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    assert "validating" == created.status
    return wait_terminal(client, created.id)


def reported(batch: Batch) -> list[tuple[str | None, int | None, str | None]]:
    """(code, line, param) of every reported error, after checking each carries a message."""
    assert batch.errors is not None
    assert all(error.message for error in batch.errors.data), batch.errors
    return [(error.code, error.line, error.param) for error in batch.errors.data]


def stored_lines(server: Server, batch_id: str) -> int:
    """How many request rows the batch has in the database, read behind the server's back."""
    query = "SELECT count(*) FROM requests WHERE batch_id = %s"
    if server.database_url.startswith("sqlite"):
        with sqlite3.connect(server.database_url.removeprefix("sqlite:///")) as conn:
            return int(conn.execute(query.replace("%s", "?"), (batch_id,)).fetchone()[0])
    with psycopg.connect(server.database_url) as conn:
        row = conn.execute(query, (batch_id,)).fetchone()
        assert row is not None
        return int(row[0])


def assert_failed_cleanly(server: Server, batch: Batch) -> None:
    """A batch that failed validation: failed_at set, never started, no files, no counts, no stored lines."""
    assert "failed" == batch.status
    assert batch.failed_at is not None
    assert batch.in_progress_at is None
    assert (None, None) == (batch.output_file_id, batch.error_file_id)
    assert (0, 0, 0) == counts(batch)
    assert 0 == stored_lines(server, batch.id)


# --- one content problem per file -------------------------------------------------------------------------

Case = tuple[list[bytes], list[tuple[str, int | None, str | None]]]
CASES: dict[str, Callable[[], Case]] = {
    "not_json": lambda: ([ok("a"), b'{"custom_id": "b", "method": ', ok("c")], [("invalid_json_line", 2, None)]),
    "json_array": lambda: ([ok("a"), b"[1, 2]"], [("invalid_request", 2, None)]),
    "json_string": lambda: ([ok("a"), b'"just text"'], [("invalid_request", 2, None)]),
    "json_null": lambda: ([ok("a"), ok("b"), b"null"], [("invalid_request", 3, None)]),
    "custom_id_missing": lambda: (
        [ok("a"), changed("b", custom_id=...)],
        [("missing_required_parameter", 2, "custom_id")],
    ),
    "custom_id_not_string": lambda: ([changed("a", custom_id=7)], [("invalid_request", 1, "custom_id")]),
    "method_missing": lambda: ([changed("a", method=...)], [("missing_required_parameter", 1, "method")]),
    "method_not_string": lambda: ([changed("a", method=["POST"])], [("invalid_request", 1, "method")]),
    "method_get": lambda: ([ok("a"), changed("b", method="GET")], [("invalid_request", 2, "method")]),
    "url_missing": lambda: ([changed("a", url=...)], [("missing_required_parameter", 1, "url")]),
    "url_not_string": lambda: ([changed("a", url=1)], [("invalid_request", 1, "url")]),
    "body_missing": lambda: ([changed("a", body=...)], [("missing_required_parameter", 1, "body")]),
    "body_not_object": lambda: ([changed("a", body="hello")], [("invalid_request", 1, "body")]),
    "body_stream": lambda: ([ok("a"), with_body("b", stream=True)], [("streaming_unsupported", 2, "body.stream")]),
    "messages_missing": lambda: ([with_body("a", messages=...)], [("invalid_request", 1, "body.messages")]),
    "max_tokens_not_integer": lambda: ([with_body("a", max_tokens="8")], [("invalid_request", 1, "body.max_tokens")]),
    "model_missing": lambda: ([with_body("a", model=...)], [("invalid_request", 1, "body.model")]),
    "duplicate_custom_id": lambda: ([ok("a"), ok("b"), ok("a")], [("duplicate_custom_id", 3, "custom_id")]),
    "url_mismatch": lambda: ([ok("a"), changed("b", url=EMBEDDINGS)], [("invalid_url", 2, "url")]),
    "model_mismatch": lambda: ([ok("a"), with_body("b", model="other-model")], [("model_mismatch", 2, "body.model")]),
    # One entry for every line that names it: a client maps each back to its request.
    "model_not_found": lambda: (
        [with_body("a", model="no-such-model"), with_body("b", model="no-such-model")],
        [("model_not_found", 1, "body.model"), ("model_not_found", 2, "body.model")],
    ),
    "too_many_tasks": lambda: ([ok(f"r{i}") for i in range(MAX_LINES + 1)], [("too_many_tasks", None, None)]),
    "line_too_long": lambda: (
        [ok("a"), orjson.dumps(chat_line("b", "x" * MAX_LINE_BYTES))],
        [("invalid_request", 2, None)],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_content_fails_the_batch_with_the_line_of_the_problem(server: Server, client: OpenAI, case: str) -> None:
    lines, expected = CASES[case]()

    batch = run_batch(client, lines)

    assert expected == reported(batch)
    assert_failed_cleanly(server, batch)


def test_invalid_json_line_carries_the_documented_message(server: Server, client: OpenAI) -> None:
    batch = run_batch(client, [ok("a"), b"{not json"])

    assert batch.errors is not None
    assert [("invalid_json_line", INVALID_JSON_MESSAGE, 2)] == [
        (error.code, error.message, error.line) for error in batch.errors.data
    ]


def test_every_problem_of_a_file_is_reported_with_its_own_line(server: Server, client: OpenAI) -> None:
    lines = [
        ok("a"),  # 1
        b"{oops",  # 2
        b"",  # 3: blank lines carry no request but still count as lines
        changed("b", method="PUT"),  # 4
        ok("a"),  # 5: duplicate of line 1
        changed("c", url=EMBEDDINGS),  # 6
        ok("d"),  # 7
    ]

    batch = run_batch(client, lines)

    assert [
        ("invalid_json_line", 2, None),
        ("invalid_request", 4, "method"),
        ("duplicate_custom_id", 5, "custom_id"),
        ("invalid_url", 6, "url"),
    ] == reported(batch)
    assert_failed_cleanly(server, batch)


def test_reported_errors_are_bounded(server: Server, client: OpenAI) -> None:
    batch = run_batch(client, [ok("a")] + [b"{bad"] * (MAX_LINES - 1))

    assert [("invalid_json_line", n, None) for n in range(2, MAX_REPORTED_ERRORS + 2)] == reported(batch)
    assert_failed_cleanly(server, batch)


def test_embedding_inputs_over_the_cap_fail_on_the_line_that_crosses_it(server: Server, client: OpenAI) -> None:
    lines = [embedding_line("a", ["one", "two", "three"]), embedding_line("b", ["four", "five"])]

    batch = run_batch(client, lines, endpoint=EMBEDDINGS)

    assert [("too_many_tasks", 2, "body.input")] == reported(batch)
    assert_failed_cleanly(server, batch)


def test_embedding_inputs_up_to_the_cap_are_accepted(server: Server, client: OpenAI) -> None:
    lines = [embedding_line("a", ["one", "two", "three"]), embedding_line("b", ["four"])]

    batch = run_batch(client, lines, endpoint=EMBEDDINGS)

    assert "completed" == batch.status
    assert (2, 2, 0) == counts(batch)


def test_a_valid_batch_of_max_lines_still_runs_after_failed_ones(server: Server, client: OpenAI) -> None:
    run_batch(client, [ok("a"), b"{bad"])
    run_batch(client, [ok("same"), ok("same")])

    batch = run_batch(client, [ok(f"r{i}") for i in range(MAX_LINES)])

    assert "completed" == batch.status
    assert batch.errors is None
    assert (MAX_LINES, MAX_LINES, 0) == counts(batch)
    assert MAX_LINES == stored_lines(server, batch.id)
    assert batch.output_file_id is not None
    assert [f"r{i}" for i in range(MAX_LINES)] == [
        line["custom_id"] for line in read_jsonl(client, batch.output_file_id)
    ]


# --- the enqueued-token quota -----------------------------------------------------------------------------


def test_token_limit_counts_the_unfinished_lines_of_other_batches(
    start_server: StartServer, upstream: Upstream, request: pytest.FixtureRequest
) -> None:
    # Prompt tokens are estimated from the line's size (about 4 bytes a token): a 2,000-byte line is ~500
    # tokens, so 4 lines are ~2,000 tokens — alone under the 3,000 limit, twice over it.
    client = client_for(start_server(default_enqueued_token_limit=3000))
    request.addfinalizer(client.close)
    tag = uuid.uuid4().hex
    padding = "pad " * 480

    def lines(name: str, n: int, directive: str = "") -> bytes:
        return jsonl([chat_line(f"{name}-{i}", f"{tag} {name} {i} {directive} {padding}") for i in range(n)])

    def create(data: bytes) -> Batch:
        uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
        return client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")

    alone_too_big = wait_terminal(client, create(lines("big", 8)).id)
    running = create(lines("slow", 4, f"#gate:{tag}"))  # held until the second batch has been refused
    wait_for(client, running.id, lambda batch: batch.status != "validating")
    refused = wait_terminal(client, create(lines("second", 4)).id)
    upstream.open_gate(tag)
    first = wait_terminal(client, running.id)
    retried = wait_terminal(client, create(lines("second", 4)).id)

    assert [("token_limit_exceeded", None, None)] == reported(alone_too_big)
    assert [("token_limit_exceeded", None, None)] == reported(refused)
    assert (0, 0, 0) == counts(refused)
    assert ("completed", (4, 4, 0)) == (first.status, counts(first))
    assert ("completed", (4, 4, 0)) == (retried.status, counts(retried))


# --- problems with the create request itself: answered synchronously ---------------------------------------


def assert_refused(exc: openai.APIStatusError, status: int, param: str | None) -> None:
    """A 4xx a retry cannot fix: the error envelope, the right status and param, and `x-should-retry: false`."""
    body = exc.response.json()
    assert {"error"} == body.keys()
    assert {"message", "type", "param", "code"} == body["error"].keys()
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert (status, "invalid_request_error", param) == (exc.status_code, body["error"]["type"], body["error"]["param"])
    assert "false" == exc.response.headers.get("x-should-retry")


def batch_file(client: OpenAI) -> str:
    return client.files.create(file=("input.jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))), purpose="batch").id


def test_a_batch_over_an_unknown_file_is_created_and_fails_with_one_error(server: Server, client: OpenAI) -> None:
    created = client.batches.create(input_file_id="file-nonexistent-xyz", endpoint=CHAT, completion_window="24h")

    batch = wait_terminal(client, created.id)

    assert ("validating", "file-nonexistent-xyz") == (created.status, created.input_file_id)
    assert [("invalid_request", None, "file_id")] == reported(batch)
    assert batch.errors is not None
    assert (
        "Cannot find file file-nonexistent-xyz, or your tenant does not have access to it."
        == batch.errors.data[0].message
    )
    assert_failed_cleanly(server, batch)


def test_openai_messages_for_the_body_fields_a_line_must_have(server: Server, client: OpenAI) -> None:
    batch = run_batch(client, [with_body("a", model=...), with_body("b", messages=...), with_body("c", stream=True)])

    assert batch.errors is not None
    assert [
        ("invalid_request", "Model parameter is required.", 1, "body.model"),
        ("invalid_request", "Messages parameter is required.", 2, "body.messages"),
        ("streaming_unsupported", "Chat Completions: Streaming is not supported in the Batch API.", 3, "body.stream"),
    ] == [(error.code, error.message, error.line, error.param) for error in batch.errors.data]


def test_create_with_a_file_of_another_purpose_is_400(client: OpenAI) -> None:
    data = io.BytesIO(jsonl([chat_line("a", "hi")]))
    user_data = client.files.create(file=("input.jsonl", data), purpose="user_data")

    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=user_data.id, endpoint=CHAT, completion_window="24h")

    assert_refused(caught.value, 400, "input_file_id")


@pytest.mark.parametrize("endpoint", ["/v1/images/generations", "/v1/chat/completions/", "chat", ""])
def test_create_with_an_unsupported_endpoint_is_400(client: OpenAI, endpoint: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=batch_file(client),
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )

    assert_refused(caught.value, 400, "endpoint")


@pytest.mark.parametrize("window", ["2h", "24", "", "1d"])
def test_create_with_a_window_not_configured_is_400(client: OpenAI, window: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=batch_file(client),
            endpoint=CHAT,
            completion_window=window,  # type: ignore[arg-type]
        )

    assert_refused(caught.value, 400, "completion_window")
    assert "invalid_value" == caught.value.code


def test_create_with_a_configured_window_other_than_24h_is_accepted(client: OpenAI) -> None:
    batch = client.batches.create(
        input_file_id=batch_file(client),
        endpoint=CHAT,
        completion_window="1h",  # type: ignore[arg-type]
    )

    assert ("1h", 3600) == (batch.completion_window, batch.expires_at - batch.created_at)
    assert "completed" == wait_terminal(client, batch.id).status


@pytest.mark.parametrize(
    ("metadata", "param", "code"),
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata", "object_above_max_properties"),
        ({"k" * 65: "v"}, "metadata", "string_above_max_length"),
        ({"k": "v" * 513}, "metadata.k", "string_above_max_length"),
        ({"tags": ["tag1", "tag2"]}, "metadata.tags", "invalid_type"),
    ],
    ids=["17_pairs", "65_char_key", "513_char_value", "array_value"],
)
def test_create_with_metadata_over_the_limits_is_400(
    client: OpenAI, metadata: dict[str, str], param: str, code: str
) -> None:
    before = [batch.id for batch in client.batches.list(limit=100).data]

    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=batch_file(client), endpoint=CHAT, completion_window="24h", metadata=metadata
        )

    assert_refused(caught.value, 400, param)
    assert code == caught.value.code
    assert before == [batch.id for batch in client.batches.list(limit=100).data]


def test_an_unsupported_endpoint_gets_the_list_of_supported_values(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(
            input_file_id=batch_file(client),
            endpoint="/v1/invalid/endpoint",  # type: ignore[arg-type]
            completion_window="24h",
        )

    assert {
        "message": "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/classify', '/rerank', '/score', "
        "'/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/v1/moderations', '/v1/rerank', "
        "'/v1/responses', and '/v1/score'.",
        "type": "invalid_request_error",
        "param": "endpoint",
        "code": "invalid_value",
    } == caught.value.response.json()["error"]


def test_a_create_body_without_a_required_field_names_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/batches", body={"endpoint": CHAT, "completion_window": "24h"}, cast_to=Batch)

    assert {
        "message": "Missing required parameter: 'input_file_id'.",
        "type": "invalid_request_error",
        "param": "input_file_id",
        "code": "missing_required_parameter",
    } == caught.value.response.json()["error"]


def test_create_with_metadata_at_the_limits_is_accepted(client: OpenAI) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}

    batch = client.batches.create(
        input_file_id=batch_file(client), endpoint=CHAT, completion_window="24h", metadata=metadata
    )

    assert metadata == batch.metadata
    assert metadata == wait_terminal(client, batch.id).metadata
