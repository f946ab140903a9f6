"""Gemini's Batch API (docs/gemini.md): GenerateContentRequest <-> chat completions, the batch Operation, the
File object and Google's Status. Pure: no I/O.

A Gemini batch runs on the machinery message batches use: each request that translates becomes one
chat-completions input line at its place (line number = request index + 1); one that cannot is stored already
failed with the reason. The line's custom_id carries what Gemini echoes back with each result: the request's
`key` (file input) or its `metadata` (inline input), as JSON with the request's index, so it is always unique.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from backfill.domain.anthropic import Untranslatable
from backfill.domain.batches import Batch, BatchStatus, RequestState
from backfill.domain.features import Feature
from backfill.domain.lines import MAX_BODY_DEPTH
from backfill.domain.message_batches import (
    CHAT_ENDPOINT,
    UnrunCounts,
    backend_error_message,
    parsed_object,
    rfc3339,
)
from backfill.domain.results import StoredResult
from backfill.errors import InvalidRequest

Json = dict[str, Any]

VERSIONS = frozenset({"v1", "v1beta"})
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
EMBED_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.EmbedContentBatch"
EMBED_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.EmbedContentBatchOutput"
RESPONSES_SUFFIX = "-responses"  # files/<batch id>-responses: the responses file of a batch made from a file

# HTTP status -> google.rpc.Code name and number (https://google.aip.dev/193), for errors and failed requests.
_CODES = {
    400: ("INVALID_ARGUMENT", 3),
    401: ("UNAUTHENTICATED", 16),
    403: ("PERMISSION_DENIED", 7),
    404: ("NOT_FOUND", 5),
    405: ("UNIMPLEMENTED", 12),
    408: ("DEADLINE_EXCEEDED", 4),
    409: ("FAILED_PRECONDITION", 9),
    413: ("INVALID_ARGUMENT", 3),
    429: ("RESOURCE_EXHAUSTED", 8),
    431: ("INVALID_ARGUMENT", 3),
    499: ("CANCELLED", 1),
    500: ("INTERNAL", 13),
    501: ("UNIMPLEMENTED", 12),
    503: ("UNAVAILABLE", 14),
    504: ("DEADLINE_EXCEEDED", 4),
}
_STATES = {
    BatchStatus.VALIDATING: "BATCH_STATE_PENDING",
    BatchStatus.IN_PROGRESS: "BATCH_STATE_RUNNING",
    BatchStatus.FINALIZING: "BATCH_STATE_RUNNING",
    BatchStatus.CANCELLING: "BATCH_STATE_RUNNING",
    BatchStatus.COMPLETED: "BATCH_STATE_SUCCEEDED",
    BatchStatus.FAILED: "BATCH_STATE_FAILED",
    BatchStatus.EXPIRED: "BATCH_STATE_EXPIRED",
    BatchStatus.CANCELLED: "BATCH_STATE_CANCELLED",
}
_FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY", "tool_calls": "STOP"}


def status_name(http_status: int) -> str:
    return _CODES.get(http_status, ("INTERNAL" if http_status >= 500 else "INVALID_ARGUMENT", 0))[0]


def rpc_code(http_status: int) -> int:
    return _CODES.get(http_status, ("", 13 if http_status >= 500 else 3))[1]


def error_body(http_status: int, message: str) -> Json:
    """Google's error envelope, as the google-genai SDK reads it."""
    return {"error": {"code": http_status, "message": message, "status": status_name(http_status)}}


# --- names ------------------------------------------------------------------------------------------------


def model_of(name: str) -> str:
    """`models/<name>` (as the SDK sends it; the name may hold `/`) -> the served model's own name."""
    return name.removeprefix("models/")


def batch_name(batch_id: str) -> str:
    return f"batches/{batch_id}"


def responses_file_id(batch_id: str) -> str:
    return f"{batch_id}{RESPONSES_SUFFIX}"


# --- create: the envelope ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a create call's requests are: inline in the call, or in an uploaded file."""

    display_name: str | None
    inline: list[Any] | None  # the raw `requests` items (each `{request, metadata}`)
    file_id: str | None  # the id (no `files/`) of an uploaded JSONL file of `{key, request}` lines


def parse_create(payload: Any) -> Source:
    """The create call's body (`{"batch": {displayName, inputConfig}}`); raises InvalidRequest (400)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("batch"), dict):
        raise InvalidRequest("The request body must be an object with a 'batch' object.", param="batch")
    batch = _camel_keys(payload["batch"])
    unknown = sorted(set(batch) - {"displayName", "inputConfig", "model", "name"})
    if unknown:
        hint = " Use backfill's own webhooks (docs/webhooks.md)." if "webhookConfig" in unknown else ""
        raise InvalidRequest(f"batch.{_printable(unknown[0])}: this field is not supported by backfill.{hint}")
    display = batch.get("displayName")
    if display is not None and not isinstance(display, str):
        raise InvalidRequest("batch.displayName: must be a string.", param="batch.displayName")
    config = batch.get("inputConfig")
    if not isinstance(config, dict):
        raise InvalidRequest("batch.inputConfig: an object with 'requests' or 'fileName' is required.")
    config = _camel_keys(config)
    file_name = config.get("fileName")
    requests = config.get("requests")
    if (file_name is None) == (requests is None):
        raise InvalidRequest("batch.inputConfig: give exactly one of 'requests' and 'fileName'.")
    if file_name is not None:
        if not isinstance(file_name, str) or not file_name.startswith("files/") or len(file_name) <= 6:
            raise InvalidRequest("batch.inputConfig.fileName: must be 'files/<id>' of an uploaded file.")
        return Source(display, None, file_name.removeprefix("files/"))
    items = requests.get("requests") if isinstance(requests, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidRequest("batch.inputConfig.requests.requests: a non-empty list of requests is required.")
    return Source(display, items, None)


@dataclass(frozen=True, slots=True)
class GeminiRequest:
    """One request of a batch: what Gemini echoes back with its result, and the GenerateContentRequest."""

    index: int
    tag: Json  # {"key": ...} (file input) or {"metadata": ...} (inline input); may be empty
    request: Any  # the GenerateContentRequest, checked when it is translated

    @property
    def custom_id(self) -> str:
        return orjson.dumps({"i": self.index, **self.tag}).decode()


def inline_request(index: int, item: Any) -> GeminiRequest:
    where = f"batch.inputConfig.requests.requests[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: must be an object with 'request' (and optionally 'metadata').")
    metadata = item.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest(f"{where}.metadata: must be an object.")
    return GeminiRequest(index, {} if metadata is None else {"metadata": metadata}, item.get("request"))


def file_request(index: int, line: bytes) -> GeminiRequest:
    """Line `index` (from 0) of an input file: `{"key": ..., "request": {...}}`."""
    where = f"line {index + 1}"
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"{where} of the input file is not valid JSON: {exc.msg}.") from None
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} of the input file: must be an object with 'key' and 'request'.")
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise InvalidRequest(f"{where} of the input file: 'key' must be a string.")
    return GeminiRequest(index, {} if key is None else {"key": key}, item.get("request"))


def tag_of(custom_id: str) -> Json:
    """What `GeminiRequest.custom_id` carries, without the index."""
    try:
        tag = orjson.loads(custom_id)
    except orjson.JSONDecodeError:
        return {}
    return {name: value for name, value in tag.items() if name != "i"} if isinstance(tag, dict) else {}


# --- GenerateContentRequest -> chat ----------------------------------------------------------------------

_REQUEST_FIELDS = frozenset({"model", "contents", "systemInstruction", "generationConfig", "safetySettings"})
_CONFIG_FIELDS = frozenset(
    {
        "temperature",
        "topP",
        "topK",
        "maxOutputTokens",
        "stopSequences",
        "candidateCount",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
    }
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel_keys(value: Json) -> Json:
    """One level of snake_case keys as camelCase (file lines may use either, as Google's own do)."""
    return {_camel(key): item for key, item in value.items()}


def _checked(request: Any, kind: str, known: frozenset[str], model: str) -> Json:
    """The request's fields in camelCase, each one known, and the model it names (if any) the batch's."""
    if not isinstance(request, dict):
        raise Untranslatable(f"request: a {kind} object is required.")
    fields = _camel_keys(request)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise Untranslatable(f"request.{_printable(unknown[0])}: this field is not supported by backfill.")
    named = fields.get("model")
    if named is not None and (not isinstance(named, str) or model_of(named) != model):
        raise Untranslatable(f"request.model: this batch runs models/{model}; send {named!r} in a batch of its own.")
    return fields


def to_chat(request: Any, model: str, features: frozenset[Feature]) -> Json:
    """The chat-completions body that runs one GenerateContentRequest on `model`; raises Untranslatable."""
    request = _checked(request, "GenerateContentRequest", _REQUEST_FIELDS, model)
    body: Json = {"model": model}
    messages = _system(request.get("systemInstruction")) + _contents(request.get("contents"))
    body["messages"] = messages
    config = request.get("generationConfig")
    if config is not None:
        if not isinstance(config, dict):
            raise Untranslatable("request.generationConfig: must be an object.")
        _generation(_camel_keys(config), body, model, features)
    return body


_EMBED_FIELDS = frozenset({"model", "content", "outputDimensionality"})


def to_embeddings(request: Any, model: str) -> Json:
    """The embeddings body for one EmbedContentRequest on `model`; raises Untranslatable. `taskType` and `title`
    steer Google's own embedding models, which an OpenAI-compatible engine has no way to honour: refused."""
    request = _checked(request, "EmbedContentRequest", _EMBED_FIELDS, model)
    content = request.get("content")
    if not isinstance(content, dict):
        raise Untranslatable("request.content: a Content object with 'parts' is required.")
    body: Json = {"model": model, "input": _text_of(content.get("parts"), "request.content")}
    if request.get("outputDimensionality") is not None:
        body["dimensions"] = _integer(request["outputDimensionality"], "request.outputDimensionality", 1)
    return body


def _printable(name: str) -> str:
    return name if name.isidentifier() else repr(name)  # no raw NUL reaches a text column


def _text_of(parts: Any, where: str) -> str:
    if not isinstance(parts, list) or not parts:
        raise Untranslatable(f"{where}.parts: a non-empty list of parts is required.")
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            kinds = ", ".join(sorted(part)) if isinstance(part, dict) else type(part).__name__
            raise Untranslatable(f"{where}.parts[{index}]: only text parts are supported by backfill (got {kinds}).")
        texts.append(part["text"])
    return "".join(texts)


def _system(instruction: Any) -> list[Json]:
    if instruction is None:
        return []
    if not isinstance(instruction, dict):
        raise Untranslatable("request.systemInstruction: must be a Content object with 'parts'.")
    return [{"role": "system", "content": _text_of(instruction.get("parts"), "request.systemInstruction")}]


def _contents(contents: Any) -> list[Json]:
    if not isinstance(contents, list) or not contents:
        raise Untranslatable("request.contents: a non-empty list of Content objects is required.")
    messages = []
    for index, content in enumerate(contents):
        where = f"request.contents[{index}]"
        if not isinstance(content, dict):
            raise Untranslatable(f"{where}: must be a Content object with 'role' and 'parts'.")
        role = content.get("role", "user")
        if role not in ("user", "model"):
            raise Untranslatable(f"{where}.role: must be 'user' or 'model', not {role!r}.")
        text = _text_of(content.get("parts"), where)
        messages.append({"role": "user" if role == "user" else "assistant", "content": text})
    if messages[-1]["role"] != "user":
        raise Untranslatable("request.contents: the last turn must be the user's.")
    return messages


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise Untranslatable(f"{where}: must be a number between {low:g} and {high:g}.")
    return float(value)


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Untranslatable(f"{where}: must be an integer of at least {minimum}.")
    return value


def _generation(config: Json, body: Json, model: str, features: frozenset[Feature]) -> None:
    where = "request.generationConfig"
    unknown = sorted(set(config) - _CONFIG_FIELDS)
    if unknown:
        raise Untranslatable(f"{where}.{_printable(unknown[0])}: this option is not supported by backfill.")
    _sampling(config, body)
    if config.get("topK") is not None:
        if Feature.TOP_K not in features:
            raise Untranslatable(f"{where}.topK: not supported by the backend that serves model {model!r}.")
        body["top_k"] = _integer(config["topK"], f"{where}.topK", 1)
    if config.get("maxOutputTokens") is not None:
        body["max_tokens"] = _integer(config["maxOutputTokens"], f"{where}.maxOutputTokens", 1)
    if config.get("seed") is not None:
        body["seed"] = _integer(config["seed"], f"{where}.seed", -(2**31))
    if config.get("candidateCount", 1) != 1:
        raise Untranslatable(f"{where}.candidateCount: only 1 candidate per request is supported by backfill.")
    stops = config.get("stopSequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
            raise Untranslatable(f"{where}.stopSequences: must be a list of non-empty strings.")
        if stops:
            body["stop"] = stops
    _structured(config, body)


_SAMPLING = (
    ("temperature", "temperature", 0.0, 2.0),
    ("topP", "top_p", 0.0, 1.0),
    ("presencePenalty", "presence_penalty", -2.0, 2.0),
    ("frequencyPenalty", "frequency_penalty", -2.0, 2.0),
)


def _sampling(config: Json, body: Json) -> None:
    for name, field, low, high in _SAMPLING:
        if config.get(name) is not None:
            body[field] = _number(config[name], f"request.generationConfig.{name}", low, high)


def _structured(config: Json, body: Json) -> None:
    where = "request.generationConfig"
    mime = config.get("responseMimeType", "text/plain")
    schema = config.get("responseJsonSchema")
    if schema is None and config.get("responseSchema") is not None:
        schema = json_schema(config["responseSchema"], f"{where}.responseSchema")
    if mime == "text/plain":
        if schema is not None:
            raise Untranslatable(f"{where}.responseSchema: needs responseMimeType 'application/json'.")
        return
    if mime != "application/json":
        raise Untranslatable(f"{where}.responseMimeType: 'text/plain' or 'application/json', not {mime!r}.")
    if schema is None:
        body["response_format"] = {"type": "json_object"}
    elif isinstance(schema, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    else:
        raise Untranslatable(f"{where}.responseJsonSchema: must be a JSON Schema object.")


_SCHEMA_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"}
_SCHEMA_FIELDS = {
    "type",
    "format",
    "description",
    "nullable",
    "enum",
    "items",
    "properties",
    "required",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "propertyOrdering",
    "title",
    "anyOf",
    "minLength",
    "maxLength",
    "pattern",
}


def json_schema(schema: Any, where: str) -> Json:
    """Gemini's Schema (an OpenAPI 3.0 subset, types in capitals) as JSON Schema."""
    if not isinstance(schema, dict):
        raise Untranslatable(f"{where}: must be a Schema object.")
    schema = _camel_keys(schema)
    unknown = sorted(set(schema) - _SCHEMA_FIELDS)
    if unknown:
        raise Untranslatable(f"{where}.{_printable(unknown[0])}: not supported in a response schema by backfill.")
    out: Json = {}
    kind = schema.get("type")
    if kind is not None:
        if not isinstance(kind, str) or kind.upper() not in _SCHEMA_TYPES:
            raise Untranslatable(f"{where}.type: one of {', '.join(sorted(_SCHEMA_TYPES))}, not {kind!r}.")
        out["type"] = [kind.lower(), "null"] if schema.get("nullable") else kind.lower()
    for name in _SCHEMA_COPIED:
        if name in schema:
            value = schema[name]
            out[name] = int(value) if isinstance(value, str) and value.isdigit() else value  # int64 as a string
    out.update(_nested_schemas(schema, where))
    return out


# Copied as they are (in JSON Schema under the same names); the bounds may come as int64 strings.
_SCHEMA_COPIED = (
    "format", "description", "enum", "required", "title", "pattern",
    "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
)  # fmt: skip


def _nested_schemas(schema: Json, where: str) -> Json:
    out: Json = {}
    if "items" in schema:
        out["items"] = json_schema(schema["items"], f"{where}.items")
    if "anyOf" in schema:
        if not isinstance(schema["anyOf"], list):
            raise Untranslatable(f"{where}.anyOf: must be a list of Schema objects.")
        out["anyOf"] = [json_schema(item, f"{where}.anyOf[{i}]") for i, item in enumerate(schema["anyOf"])]
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            raise Untranslatable(f"{where}.properties: must be an object of Schema objects.")
        out["properties"] = {
            name: json_schema(item, f"{where}.properties.{_printable(name)}") for name, item in properties.items()
        }
    return out


def input_line(request: GeminiRequest, body: Json, endpoint: str = CHAT_ENDPOINT) -> bytes:
    """The input line (no newline) of a translated request; raises InvalidRequest (400) for a request nested
    deeper than a line can be written."""
    line = {"custom_id": request.custom_id, "method": "POST", "url": endpoint, "body": body}
    try:
        return orjson.dumps(line)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            f"request {request.index}: nested more than {MAX_BODY_DEPTH} levels deep, more than a request sent to a "
            "backend may be."
        ) from None


# --- results ----------------------------------------------------------------------------------------------


def status(code: int, message: str) -> Json:
    """A google.rpc.Status."""
    return {"code": code, "message": message}


def outcome(result: StoredResult, model: str | None, endpoint: str = CHAT_ENDPOINT) -> Json:
    """`{"response": GenerateContentResponse}` (for an embeddings batch: `{"response": {"embedding"}}`) or
    `{"error": Status}` for one finished request."""
    if result.state is RequestState.EXPIRED:
        return {"error": status(4, "The batch expired before this request ran.")}
    if result.state is RequestState.CANCELLED:
        return {"error": status(1, "The batch was cancelled before this request ran.")}
    if result.is_success and result.body is not None:
        try:
            answer = parsed_object(result.body)
            embedded = endpoint == EMBEDDINGS_ENDPOINT
            return {"response": to_embedding(answer) if embedded else to_response(answer, model or "")}
        except Untranslatable as exc:
            return {"error": status(13, str(exc))}
    if result.status_code is not None:
        message = backend_error_message(result.status_code, result.body)
        return {"error": status(rpc_code(result.status_code), message)}
    code = {"invalid_request": 3, "timeout": 4}.get(result.error_code or "", 13)
    return {"error": status(code, result.error_message or "The request could not be run.")}


def inlined_response(result: StoredResult, model: str | None, endpoint: str = CHAT_ENDPOINT) -> Json:
    tag = tag_of(result.custom_id)
    return {**outcome(result, model, endpoint), **({"metadata": tag["metadata"]} if "metadata" in tag else {})}


def responses_line(result: StoredResult, model: str | None, endpoint: str = CHAT_ENDPOINT) -> bytes:
    """One line (with its newline) of a batch's responses file: `{"key", "response" | "error"}`."""
    tag = tag_of(result.custom_id)
    line = {**({"key": tag["key"]} if "key" in tag else {}), **outcome(result, model, endpoint)}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def to_embedding(answer: Json) -> Json:
    """An embeddings answer (one input) as Gemini's SingleEmbedContentResponse."""
    data = answer.get("data")
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None
    vector = first.get("embedding") if first is not None else None
    if not isinstance(vector, list):
        raise Untranslatable("The backend's answer has no embedding (as a list of floats).")
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return {"embedding": {"values": vector}, **({"tokenCount": tokens} if isinstance(tokens, int) else {})}


def to_response(completion: Json, model: str) -> Json:
    """A chat completion as a GenerateContentResponse."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Untranslatable("The backend's answer has no choices.")
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    text = content if isinstance(content, str) else ""
    candidate = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "finishReason": _FINISH_REASONS.get(str(choice.get("finish_reason")), "OTHER"),
        "index": 0,
    }
    usage = completion.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    prompt, output = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    counts: Json = {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and cached:
        counts["cachedContentTokenCount"] = cached
    response: Json = {"candidates": [candidate], "usageMetadata": counts, "modelVersion": model}
    if isinstance(completion.get("id"), str):
        response["responseId"] = completion["id"]
    return response


# --- the batch Operation and the File ---------------------------------------------------------------------


def state(batch: Batch) -> str:
    return _STATES[batch.status]


def _ended_at(batch: Batch) -> int | None:
    times = (batch.completed_at, batch.expired_at, batch.cancelled_at, batch.failed_at)
    return next((t for t in times if t is not None), None) if batch.status.is_terminal else None


def _updated_at(batch: Batch) -> int:
    times = (
        batch.created_at,
        batch.in_progress_at,
        batch.finalizing_at,
        batch.cancelling_at,
        batch.completed_at,
        batch.expired_at,
        batch.cancelled_at,
        batch.failed_at,
    )
    return max(t for t in times if t is not None)


def batch_stats(batch: Batch, unrun: UnrunCounts) -> Json:
    """Counts as proto3 JSON writes int64: strings."""
    pending = 0 if batch.status.is_terminal else max(0, batch.total - batch.completed - batch.failed)
    return {
        "requestCount": str(batch.total),
        "successfulRequestCount": str(batch.completed),
        "failedRequestCount": str(batch.total - batch.completed - pending),
        "pendingRequestCount": str(pending),
    }


def operation(batch: Batch, unrun: UnrunCounts, output: Json | None, display_name: str | None) -> Json:
    """The batch as the long-running Operation the Batch API answers with; `output` once it has ended."""
    metadata: Json = {
        "@type": BATCH_TYPE if batch.endpoint == CHAT_ENDPOINT else EMBED_BATCH_TYPE,
        "name": batch_name(batch.id),
        "model": f"models/{batch.model}" if batch.model else None,
        "displayName": display_name or "",
        "createTime": rfc3339(batch.created_at),
        "updateTime": rfc3339(_updated_at(batch)),
        "state": state(batch),
        "batchStats": batch_stats(batch, unrun),
    }
    if batch.status.is_terminal:
        metadata["endTime"] = rfc3339(_ended_at(batch))
    answer: Json = {"name": batch_name(batch.id), "metadata": {k: v for k, v in metadata.items() if v is not None}}
    answer["backfill"] = batch.extension()  # ours, beside Google's keys (the SDK reads only the keys it knows)
    if output is not None:
        metadata_output = dict(output)
        answer["metadata"]["output"] = metadata_output
        answer["done"] = True
        kind = OUTPUT_TYPE if batch.endpoint == CHAT_ENDPOINT else EMBED_OUTPUT_TYPE
        answer["response"] = {"@type": kind, **output}
    return answer


def file_object(
    file_id: str,
    *,
    display_name: str | None,
    mime_type: str,
    size: int | None,
    created_at: int,
    expires_at: int | None,
    server_url: str,
    generated: bool = False,
) -> Json:
    """A File resource; `server_url` is where clients reach this server's Gemini API (…/gemini/v1beta)."""
    uri = f"{server_url}/files/{file_id}"
    answer: Json = {
        "name": f"files/{file_id}",
        "mimeType": mime_type,
        "createTime": rfc3339(created_at),
        "updateTime": rfc3339(created_at),
        "uri": uri,
        "state": "ACTIVE",
        "source": "GENERATED" if generated else "UPLOADED",
    }
    if size is not None:
        answer["sizeBytes"] = str(size)
    if display_name:
        answer["displayName"] = display_name
    if expires_at is not None:
        answer["expirationTime"] = rfc3339(expires_at)
    if generated:
        answer["downloadUri"] = f"{uri}:download?alt=media"
    return answer
