"""Errors -> the OpenAI error envelope (SPEC §1), Anthropic's under /v1/messages (SPEC §4), Google's under /gemini
(docs/gemini.md), in one table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from backfill import ids
from backfill.domain.gemini import error_body as gemini_error_body
from backfill.domain.message_batches import error_type as anthropic_error_type
from backfill.errors import ApiError, BlobStoreUnavailable, QuotaExceeded
from backfill.http.request_ids import request_id_of
from backfill.usecases import params

log = structlog.get_logger(__name__)

# Errors a retry cannot fix: tell the SDKs not to retry them.
NO_RETRY = frozenset({400, 401, 403, 404, 405, 409, 413, 422})
ANTHROPIC_PREFIX = "/v1/messages"
GEMINI_PREFIX = "/gemini/"
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    retryable: bool = False,
) -> Response:
    body = {
        "error": {
            "message": message,
            "type": error_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }
    answer_headers = dict(headers or {})
    if status in NO_RETRY and not retryable:
        answer_headers["x-should-retry"] = "false"
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=answer_headers)


def anthropic_error_response(
    status: int, message: str, request_id: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """`{"type": "error", "error": {type, message}, "request_id"}`, the type named for the status."""
    request_id = request_id or ids.request_id()
    body = {
        "type": "error",
        "error": {"type": anthropic_error_type(status), "message": message},
        "request_id": request_id,
    }
    answer_headers = {**(headers or {}), "request-id": request_id, "x-request-id": request_id}
    if status in NO_RETRY:
        answer_headers["x-should-retry"] = "false"
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=answer_headers)


def google_error_response(
    status: int, message: str, request_id: str, headers: Mapping[str, str] | None = None
) -> Response:
    """`{"error": {code, message, status}}`, Google's envelope (the google-genai SDK reads it)."""
    answer_headers = {**(headers or {}), "x-request-id": request_id}
    return Response(
        orjson.dumps(gemini_error_body(status, message)),
        status_code=status,
        media_type="application/json",
        headers=answer_headers,
    )


def _answer(
    request: Request, status: int, message: str, headers: Mapping[str, str] | None = None, **openai_fields: Any
) -> Response:
    """Each API's own envelope: the anthropic SDK reads only Anthropic's, the openai SDK only OpenAI's."""
    request_id = request_id_of(request)
    if request.url.path.startswith(GEMINI_PREFIX):
        return google_error_response(status, message, request_id, headers)
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        openai_fields.pop("retryable", None)  # no Anthropic route has a retryable 4xx
        return anthropic_error_response(status, message, request_id, headers)
    return error_response(status, message, headers={**(headers or {}), "x-request-id": request_id}, **openai_fields)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's): each
    method tried against the routes, through nothing but their public `matches`."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def _route_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The router's own 404 and 405, in the envelope, with what the client needs to fix the call."""
    method, path = request.method, request.url.path
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        return _answer(
            request,
            405,
            f"Method {method} not allowed for {path}. Allowed: {', '.join(allowed)}.",
            headers={"Allow": ", ".join(allowed)},
            code="method_not_allowed",
        )
    if exc.status_code == 404:
        return _answer(request, 404, f"Invalid URL ({method} {path})", code="unknown_url")
    return _answer(request, exc.status_code, str(exc.detail), headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        retry_after_s = exc.retry_after_s if isinstance(exc, QuotaExceeded) else None
        return _answer(
            request,
            exc.status_code,
            exc.message,
            headers={"retry-after": str(retry_after_s)} if retry_after_s is not None else None,
            error_type=exc.error_type,
            param=exc.param,
            code=exc.code,
            retryable=exc.retryable,
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _route_error(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {}
        error = params.from_validation_error(first)
        return _answer(request, 400, error.message, param=error.param, code=error.code)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        log.info("http.client_disconnected")  # nobody is left to read an answer; nothing was kept
        return _answer(request, 400, "The client disconnected before the request body was complete.")

    async def on_blobs_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("http.blob_store_unavailable", error=str(exc))
        return _answer(request, 503, "The file store is unavailable; try again shortly.")  # the SDKs retry 503

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("http.unhandled", exc_info=exc)
        return _answer(request, 500, "The server had an error while processing your request.")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(BlobStoreUnavailable, on_blobs_unavailable)
    app.add_exception_handler(Exception, on_unexpected)
