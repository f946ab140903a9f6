"""Message batches (SPEC §4): the request envelope, the plan that turns it into OpenAI batch lines, the
MessageBatch object, and the result line of each request. Pure: no I/O.

A message batch runs on the OpenAI batch machinery: each request that translates becomes one chat-completions
input line, at the same position as the request (line number = request index + 1), so results stream back in
request order. A request that cannot run has no input line; it is stored already `failed`, with the reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from backfill.domain.anthropic import Untranslatable, to_chat, to_message
from backfill.domain.batches import Batch, BatchStatus, RequestState
from backfill.domain.features import Feature
from backfill.domain.lines import MAX_BODY_DEPTH
from backfill.domain.results import StoredResult
from backfill.errors import InvalidRequest

Json = dict[str, Any]

CHAT_ENDPOINT = "/v1/chat/completions"
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Stored as a line's error_code when its request was refused before running: the request was at fault.
REFUSED = "invalid_request"

# HTTP status -> Anthropic error type, for the error envelope and for errored results alike.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


# --- the envelope -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchRequest:
    custom_id: str
    params: Json


def parse_requests(payload: Any, max_requests: int) -> list[BatchRequest]:
    """The requests of a create call; raises InvalidRequest (400) for any problem with the envelope itself.

    Problems inside `params` are not checked here: they end that one request `errored`.
    """
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    requests = payload.get("requests")
    if not isinstance(requests, list):
        raise InvalidRequest("requests: a list of requests is required.", param="requests")
    check_count(len(requests), max_requests)
    seen: set[str] = set()
    return [parse_request(index, item, seen) for index, item in enumerate(requests)]


def check_count(count: int, max_requests: int) -> None:
    if not 1 <= count <= max_requests:
        raise InvalidRequest(
            f"requests: a message batch holds 1 to {max_requests} requests, not {count}.", param="requests"
        )


def parse_request(index: int, item: Any, seen: set[str]) -> BatchRequest:
    """Request `index` of the envelope, its custom_id unique among those `seen` (it is added to them)."""
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: must be an object with 'custom_id' and 'params'.", param=where)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise InvalidRequest(
            f"{where}.custom_id: must be 1 to 64 letters, digits, '_' or '-' (^[a-zA-Z0-9_-]{{1,64}}$).",
            param=f"{where}.custom_id",
        )
    if custom_id in seen:
        raise InvalidRequest(
            f"{where}.custom_id: {custom_id!r} is used by more than one request; it must be unique in the batch.",
            param=f"{where}.custom_id",
        )
    seen.add(custom_id)
    params = item.get("params")
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}.params: must be an object of Messages API parameters.", param=where)
    return BatchRequest(custom_id, params)


# --- the plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request: its OpenAI batch input line (JSON, no newline) if it can run, else why it cannot."""

    custom_id: str
    line: bytes | None
    refusal: str | None


@dataclass(frozen=True, slots=True)
class RefusedRequest:
    """A request that cannot run, kept as an already-failed line at its place in the batch."""

    number: int  # its line number: request index + 1
    custom_id: str
    offset: int  # where its (empty) line lies in the input file
    message: str


@dataclass(frozen=True)
class Plan:
    model: str | None  # the one model the batch runs (None: no request can run)
    requests: list[PlannedRequest]


def plan_requests(
    requests: list[BatchRequest],
    is_served: Callable[[str], bool],
    features_of: Callable[[str], frozenset[Feature]],
) -> Plan:
    """Translate every request. A batch runs one model, like an OpenAI batch: the first served model named."""
    model = next((name for request in requests if (name := served_model(request, is_served)) is not None), None)
    features = features_of(model) if model is not None else frozenset()
    return Plan(
        model, [plan_request(index, request, model, is_served, features) for index, request in enumerate(requests)]
    )


def served_model(request: BatchRequest, is_served: Callable[[str], bool]) -> str | None:
    """The model a request names, if some backend serves it."""
    name = request.params.get("model")
    return name if isinstance(name, str) and name and is_served(name) else None


def plan_request(
    index: int, request: BatchRequest, model: str | None, is_served: Callable[[str], bool], features: frozenset[Feature]
) -> PlannedRequest:
    """Request `index` translated for the batch's `model` (whose backends have `features`), or why it cannot run.
    Raises InvalidRequest (400) for params nested deeper than a line can be written (MAX_BODY_DEPTH)."""
    name = request.params.get("model")
    if isinstance(name, str) and name and not is_served(name):
        return PlannedRequest(
            request.custom_id, None, f"params.model: the model {name!r} is not served by any backend of this server."
        )
    if isinstance(name, str) and model is not None and name != model:
        return PlannedRequest(
            request.custom_id,
            None,
            f"params.model: a message batch runs a single model here; this batch runs {model!r} (the first "
            f"request's), so send the {name!r} requests in a batch of their own.",
        )
    try:
        body = to_chat(request.params, features)
    except Untranslatable as exc:
        return PlannedRequest(request.custom_id, None, str(exc))
    try:
        line = orjson.dumps({"custom_id": request.custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body})
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            f"requests.{index}.params: nested more than {MAX_BODY_DEPTH} levels deep, more than a request sent to a "
            "backend may be.",
            param=f"requests.{index}.params",
        ) from None
    return PlannedRequest(request.custom_id, line, None)


# --- the MessageBatch object ------------------------------------------------------------------------------


def rfc3339(unix_s: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s)) if unix_s is not None else None


@dataclass(frozen=True)
class UnrunCounts:
    """Lines of a batch that ended without running: counted apart from errors in `request_counts`."""

    expired: int = 0
    canceled: int = 0


def processing_status(status: BatchStatus) -> str:
    if status is BatchStatus.CANCELLING:
        return "canceling"
    return "ended" if status.is_terminal else "in_progress"


def ended_at(batch: Batch) -> int | None:
    if not batch.status.is_terminal:
        return None
    return next(
        (t for t in (batch.completed_at, batch.expired_at, batch.cancelled_at, batch.failed_at) if t is not None),
        None,
    )


def request_counts(batch: Batch, unrun: UnrunCounts) -> dict[str, int]:
    """Live counts that always sum to the number of requests (SPEC §4 decision: not held until the end)."""
    processing = 0 if batch.status.is_terminal else max(0, batch.total - batch.completed - batch.failed)
    errored = batch.total - processing - batch.completed - unrun.expired - unrun.canceled
    return {
        "processing": processing,
        "succeeded": batch.completed,
        "errored": max(0, errored),
        "canceled": unrun.canceled,
        "expired": unrun.expired,
    }


def message_batch_object(batch: Batch, unrun: UnrunCounts, server_url: str) -> Json:
    """The MessageBatch; `server_url` (no trailing slash) is where clients reach this server."""
    status = processing_status(batch.status)
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": request_counts(batch, unrun),
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.expires_at),
        "ended_at": rfc3339(ended_at(batch)),
        "cancel_initiated_at": rfc3339(batch.cancelling_at),
        "archived_at": rfc3339(batch.archived_at),
        "results_url": f"{server_url}/v1/messages/batches/{batch.id}/results" if status == "ended" else None,
        # Ours, beside Anthropic's keys (the SDK keeps unknown fields): the scheduler's outlook, as on a batch.
        "backfill": batch.extension(),
    }


def archive_at(batch: Batch, retention_s: int, now: float) -> int | None:
    """When an ended batch's results stopped being kept, if that time has come and it is not yet recorded."""
    due = batch.created_at + retention_s
    return due if batch.status.is_terminal and batch.archived_at is None and now >= due else None


# --- results ----------------------------------------------------------------------------------------------


def result_line(result: StoredResult, model: str | None) -> bytes:
    """One line (with its newline) of the results stream."""
    outcome: Json
    if result.state is RequestState.EXPIRED:
        outcome = {"type": "expired"}
    elif result.state is RequestState.CANCELLED:
        outcome = {"type": "canceled"}
    elif result.is_success and result.body is not None:
        outcome = _succeeded(result, model or "")
    else:
        outcome = _failure(result)
    return orjson.dumps({"custom_id": result.custom_id, "result": outcome}, option=orjson.OPT_APPEND_NEWLINE)


def _succeeded(result: StoredResult, model: str) -> Json:
    # The same id on every read of the results: derived from the line's result id (its custom_id at worst).
    message_id = "msg_" + (result.result_id or result.custom_id).removeprefix("batch_req_")
    try:
        message = to_message(parsed_object(result.body or b""), message_id=message_id, model=model)
    except Untranslatable as exc:
        return _errored("api_error", str(exc), result.request_id)
    return {"type": "succeeded", "message": message}


def parsed_object(body: bytes) -> Json:
    """A backend's answer as a JSON object; raises Untranslatable for anything else."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise Untranslatable("The backend's answer is not a JSON object.")
    return parsed


def _errored(kind: str, message: str, request_id: str | None) -> Json:
    error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return {"type": "errored", "error": error}


def backend_error_message(status_code: int, body: bytes | None) -> str:
    """`The backend answered 400: <its error message>` (without the message when its body has none)."""
    message = f"The backend answered {status_code}."
    try:
        error = parsed_object(body or b"").get("error")
    except Untranslatable:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        message = f"{message[:-1]}: {error['message']}"
    return message


def _failure(result: StoredResult) -> Json:
    if result.status_code is not None:
        message = backend_error_message(result.status_code, result.body)
        return _errored(error_type(result.status_code), message, result.request_id)
    kind = {REFUSED: "invalid_request_error", "timeout": "timeout_error"}.get(result.error_code or "", "api_error")
    return _errored(kind, result.error_message or "The request could not be run.", result.request_id)
