"""Background and flex calls (docs/flex.md): a `background: true` Responses call or a `service_tier: "flex"`
call runs as a one-line batch; this is how its request becomes that line and how the line's state reads back as
OpenAI's Response object. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.responses import complete_response
from backfill.domain.results import StoredResult
from backfill.errors import InvalidRequest

CUSTOM_ID = "response"
FLEX_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# Fields that ask backfill how to run the call, not the engine what to generate: never forwarded (an engine may
# refuse a tier it does not know; `background` means nothing to it).
_OURS = ("background", "service_tier")
# Fields of the request the Response object echoes (the rest of what the SDK requires has defaults).
_ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id",
           "reasoning", "temperature", "text", "tool_choice", "tools", "top_p", "truncation", "user")  # fmt: skip
_FINISHED = (RequestState.SUCCEEDED, RequestState.FAILED, RequestState.EXPIRED, RequestState.CANCELLED)


def is_deferred(endpoint: str, body: dict[str, Any]) -> tuple[bool, bool]:
    """(background, flex) of a proxied call; raises InvalidRequest for a background call that cannot be one."""
    background = endpoint == "/v1/responses" and body.get("background") is True
    flex = endpoint in FLEX_ENDPOINTS and body.get("service_tier") == "flex"
    if background and body.get("stream") is True:
        raise InvalidRequest(
            "Streaming a background response is not supported here; send it without `stream: true` and poll "
            "GET /v1/responses/{id}.",
            param="stream",
        )
    return background, flex


def input_line(endpoint: str, body: dict[str, Any]) -> bytes:
    """The batch input line that runs `body`, without the fields that are backfill's to read."""
    forwarded = {key: value for key, value in body.items() if key not in _OURS}
    return orjson.dumps({"custom_id": CUSTOM_ID, "method": "POST", "url": endpoint, "body": forwarded})


def echo_of(body: dict[str, Any]) -> str:
    """What the Response object echoes of the request, kept with the batch (its metadata is text)."""
    echoed = {key: body[key] for key in _ECHOED if key in body}
    echoed["service_tier"] = body.get("service_tier") or "auto"
    return orjson.dumps(echoed).decode()


def is_finished(result: StoredResult) -> bool:
    return result.state in _FINISHED


def response_status(batch_status: BatchStatus, result: StoredResult) -> str:
    """OpenAI's Response status of a background call, from its batch and its one line. A cancel that was accepted
    wins (it is refused once the call is finished), even if the engine's answer came in during the cancel's grace."""
    if result.state is RequestState.CANCELLED or batch_status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return "cancelled"
    if result.state is RequestState.SUCCEEDED:
        body = _object(result.body)
        return "incomplete" if body.get("status") == "incomplete" else "completed"
    if result.state in (RequestState.FAILED, RequestState.EXPIRED):
        return "failed"
    return "in_progress" if result.state is RequestState.LEASED else "queued"


def error_message(result: StoredResult) -> str:
    """Why a line failed, in a sentence: the engine's own message where it gave one."""
    error = _object(result.body).get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if result.state is RequestState.EXPIRED:
        return "The response could not be run before its window ended."
    return result.error_message or "The engine gave no usable answer."


def response_object(
    response_id: str, created_at: int, model: str, batch_status: BatchStatus, result: StoredResult, echo: str
) -> dict[str, Any]:
    """The Response object `GET /v1/responses/{id}` answers: the engine's, once it is done, with our id."""
    status = response_status(batch_status, result)
    request: dict[str, Any] = orjson.loads(echo) if echo else {}
    response: dict[str, Any] = {"created_at": created_at, "model": model}
    if status in ("completed", "incomplete"):
        response |= _object(result.body)
    elif status == "failed":
        response["error"] = {"code": "server_error", "message": error_message(result)}
    response |= {"id": response_id, "status": status, "background": True, "service_tier": request.get("service_tier")}
    return complete_response(response, request)


def flex_answer(body: bytes | None, endpoint: str, request: dict[str, Any]) -> bytes:
    """A flex call's answer: the engine's body, with the tier it ran in (and a Response object completed)."""
    answer = _object(body)
    if not answer:
        return body or b"{}"
    answer["service_tier"] = "flex"
    if endpoint == "/v1/responses":
        answer = complete_response(answer, request)
    return orjson.dumps(answer)


def _object(body: bytes | None) -> dict[str, Any]:
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
