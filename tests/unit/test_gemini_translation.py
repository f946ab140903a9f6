"""GenerateContentRequest -> chat completions and back (domain.gemini): every field either honoured or refused by
name, never dropped."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from backfill.domain import gemini
from backfill.domain.anthropic import Untranslatable
from backfill.domain.batches import RequestState
from backfill.domain.features import ALL_FEATURES
from backfill.domain.results import StoredResult
from backfill.errors import InvalidRequest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def test_contents_system_instruction_and_generation_config_become_a_chat_body() -> None:
    request = {
        "model": f"models/{MODEL}",
        "systemInstruction": {"parts": [{"text": "Be brief. "}, {"text": "Answer in French."}]},
        "contents": [user("Hi"), {"role": "model", "parts": [{"text": "Bonjour"}]}, user("Name a colour")],
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.9,
            "topK": 40,
            "maxOutputTokens": 64,
            "stopSequences": ["\n\n"],
            "seed": 7,
            "candidateCount": 1,
        },
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }

    body = gemini.to_chat(request, MODEL, ALL_FEATURES)

    assert {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief. Answer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Name a colour"},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 64,
        "stop": ["\n\n"],
        "seed": 7,
    } == body


def test_snake_case_fields_are_read_as_google_reads_them() -> None:
    request = {
        "contents": [user("x")],
        "system_instruction": {"parts": [{"text": "s"}]},
        "generation_config": {"max_output_tokens": 5, "stop_sequences": ["."]},
    }

    body = gemini.to_chat(request, MODEL, ALL_FEATURES)

    assert (5, ["."], "system") == (body["max_tokens"], body["stop"], body["messages"][0]["role"])


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        ({"contents": [user("x")], "tools": [{}]}, "request.tools"),
        ({"contents": [user("x")], "generationConfig": {"candidateCount": 2}}, "candidateCount"),
        ({"contents": [user("x")], "generationConfig": {"responseModalities": ["AUDIO"]}}, "responseModalities"),
        ({"contents": [user("x")], "generationConfig": {"temperature": 3}}, "temperature"),
        ({"contents": [{"role": "user", "parts": [{"inlineData": {"data": "AA"}}]}]}, "only text parts"),
        ({"contents": [{"role": "model", "parts": [{"text": "x"}]}]}, "last turn"),
        ({"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "'user' or 'model'"),
        ({"contents": []}, "request.contents"),
        ({"contents": [user("x")], "model": "models/other"}, "request.model"),
        ({"contents": [user("x")], "generationConfig": {"responseMimeType": "text/x.enum"}}, "responseMimeType"),
        ("not an object", "GenerateContentRequest"),
    ],
)
def test_what_cannot_run_is_refused_naming_the_field(request_: Any, named: str) -> None:
    with pytest.raises(Untranslatable, match=named):
        gemini.to_chat(request_, MODEL, ALL_FEATURES)


def test_top_k_is_refused_where_the_backend_does_not_take_it() -> None:
    with pytest.raises(Untranslatable, match="topK"):
        gemini.to_chat({"contents": [user("x")], "generationConfig": {"topK": 3}}, MODEL, frozenset())


def test_a_response_schema_becomes_a_json_schema_response_format() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "label": {"type": "STRING", "enum": ["positive", "negative"]},
            "score": {"type": "NUMBER", "nullable": True},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": "3"},
        },
        "required": ["label"],
        "propertyOrdering": ["label", "score", "tags"],
    }
    config = {"responseMimeType": "application/json", "responseSchema": schema}

    body = gemini.to_chat({"contents": [user("x")], "generationConfig": config}, MODEL, ALL_FEATURES)

    assert {
        "type": "json_schema",
        "json_schema": {
            "name": "response",
            "schema": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "enum": ["positive", "negative"]},
                    "score": {"type": ["number", "null"]},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                },
                "required": ["label"],
            },
        },
    } == body["response_format"]


def test_json_without_a_schema_is_json_object_and_a_json_schema_passes_as_it_is() -> None:
    plain = gemini.to_chat(
        {"contents": [user("x")], "generationConfig": {"responseMimeType": "application/json"}}, MODEL, ALL_FEATURES
    )
    given = {"type": "object", "properties": {"a": {"type": "integer"}}}
    direct = gemini.to_chat(
        {
            "contents": [user("x")],
            "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": given},
        },
        MODEL,
        ALL_FEATURES,
    )

    assert {"type": "json_object"} == plain["response_format"]
    assert given == direct["response_format"]["json_schema"]["schema"]


def test_a_schema_without_the_json_mime_type_is_refused() -> None:
    config = {"responseSchema": {"type": "STRING"}}
    with pytest.raises(Untranslatable, match="application/json"):
        gemini.to_chat({"contents": [user("x")], "generationConfig": config}, MODEL, ALL_FEATURES)


def completion(text: str, finish: str = "stop") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}},
        }
    )


def result(custom_id: str, **fields: Any) -> StoredResult:
    values: dict[str, Any] = {
        "state": RequestState.SUCCEEDED,
        "result_id": "batch_req_1",
        "status_code": 200,
        "request_id": "req_1",
        "body": None,
        "error_code": None,
        "error_message": None,
    }
    return StoredResult(custom_id=custom_id, **{**values, **fields})


def test_a_completion_answers_as_a_generate_content_response_with_its_metadata() -> None:
    tagged = gemini.GeminiRequest(0, {"metadata": {"n": "1"}}, {})

    answer = gemini.inlined_response(result(tagged.custom_id, body=completion("Bleu", "length")), MODEL)

    assert {
        "response": {
            "candidates": [
                {"content": {"parts": [{"text": "Bleu"}], "role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": 11,
                "candidatesTokenCount": 3,
                "totalTokenCount": 14,
                "cachedContentTokenCount": 8,
            },
            "modelVersion": MODEL,
            "responseId": "chatcmpl-1",
        },
        "metadata": {"n": "1"},
    } == answer


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"state": RequestState.FAILED, "status_code": 400, "body": b'{"error": {"message": "bad"}}'}, 3),
        ({"state": RequestState.FAILED, "status_code": 503, "body": b"down"}, 14),
        ({"state": RequestState.FAILED, "status_code": None, "error_code": "invalid_request"}, 3),
        ({"state": RequestState.FAILED, "status_code": None, "error_code": "timeout"}, 4),
        ({"state": RequestState.EXPIRED, "status_code": None}, 4),
        ({"state": RequestState.CANCELLED, "status_code": None}, 1),
    ],
)
def test_a_request_that_did_not_succeed_answers_a_status_with_googles_code(fields: dict[str, Any], code: int) -> None:
    tagged = gemini.GeminiRequest(3, {"key": "k3"}, {})

    line = orjson.loads(gemini.responses_line(result(tagged.custom_id, **fields), MODEL))

    assert ("k3", code) == (line["key"], line["error"]["code"])
    assert line["error"]["message"]


def test_the_create_envelope_takes_inline_requests_or_a_file_and_nothing_else() -> None:
    inline = gemini.parse_create({"batch": {"displayName": "d", "inputConfig": {"requests": {"requests": [{}]}}}})
    from_file = gemini.parse_create({"batch": {"input_config": {"file_name": "files/file-1"}}})

    assert ("d", [{}], None) == (inline.display_name, inline.inline, inline.file_id)
    assert (None, "file-1") == (from_file.inline, from_file.file_id)
    for payload in (
        {},
        {"batch": {}},
        {"batch": {"inputConfig": {}}},
        {"batch": {"inputConfig": {"fileName": "x", "requests": {"requests": [{}]}}}},
        {"batch": {"inputConfig": {"fileName": "file-1"}}},
        {"batch": {"inputConfig": {"requests": {"requests": []}}}},
        {"batch": {"inputConfig": {"fileName": "files/f"}, "webhookConfig": {"uris": ["https://x"]}}},
    ):
        with pytest.raises(InvalidRequest):
            gemini.parse_create(payload)


def test_file_lines_need_a_string_key_and_json() -> None:
    assert {"key": "a"} == gemini.file_request(0, b'{"key": "a", "request": {}}').tag
    with pytest.raises(InvalidRequest, match="line 2"):
        gemini.file_request(1, b"{not json")
    with pytest.raises(InvalidRequest, match="'key' must be a string"):
        gemini.file_request(0, b'{"key": 1, "request": {}}')


def test_errors_are_in_googles_envelope() -> None:
    assert {"error": {"code": 404, "message": "gone", "status": "NOT_FOUND"}} == gemini.error_body(404, "gone")
    assert "RESOURCE_EXHAUSTED" == gemini.status_name(429)
