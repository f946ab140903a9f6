"""Output and error file lines (SPEC §3), built from stored results without re-parsing response bodies."""

from __future__ import annotations

import msgspec
import orjson

from backfill.domain.batches import RequestState

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


class StoredResult(msgspec.Struct, frozen=True):
    """A finished line as the store keeps it."""

    custom_id: str
    state: RequestState
    result_id: str | None
    status_code: int | None
    request_id: str | None
    body: bytes | None  # the backend's JSON body, verbatim
    error_code: str | None
    error_message: str | None
    cached_from: str | None = None  # the line whose answer this one reuses (the result cache)

    @property
    def is_success(self) -> bool:
        return self.state is RequestState.SUCCEEDED


def error_for_unrun(state: RequestState) -> tuple[str, str]:
    if state is RequestState.EXPIRED:
        return "batch_expired", EXPIRED_MESSAGE
    return "batch_cancelled", CANCELLED_MESSAGE


def output_line(result: StoredResult, fallback_id: str) -> bytes:
    """One JSONL line (with its newline) for the output file or the error file."""
    response: dict[str, object] | None = None
    error: dict[str, object] | None = None
    if result.status_code is not None and result.body is not None:
        response = {
            "status_code": result.status_code,
            "request_id": result.request_id,
            "body": orjson.Fragment(result.body),
        }
    elif result.state in (RequestState.EXPIRED, RequestState.CANCELLED):
        code, message = error_for_unrun(result.state)
        if result.state is RequestState.EXPIRED and result.error_message:
            message = f"{message} Last backend error: {result.error_message}"  # it waited through an outage
        error = {"code": code, "message": message}
    else:
        error = {"code": result.error_code or "backend_unavailable", "message": result.error_message or ""}
    line: dict[str, object] = {
        "id": result.result_id or fallback_id,
        "custom_id": result.custom_id,
        "response": response,
        "error": error,
    }
    if result.cached_from is not None:  # extension: answered from the result cache, not by a backend
        line["backfill"] = {"cached": True, "cached_from": result.cached_from}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
