"""OpenAIHttpBackend: any OpenAI-compatible inference server (vLLM, SGLang, llama.cpp server, OpenAI, …)."""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any

import httpx
import orjson

from backfill.config import BackendSettings
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage

_MAX_ERROR_TEXT = 2000


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


class OpenAIHttpBackend:
    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient | None = None) -> None:
        self.name = settings.name
        self.models = frozenset(settings.models)
        self.max_concurrency = settings.max_concurrency
        self.request_timeout_s = settings.request_timeout_s
        base = settings.url.rstrip("/")
        self._base = base.removesuffix("/v1")
        headers = {"content-type": "application/json"}
        if (key := settings.api_key()) is not None:
            headers["authorization"] = f"Bearer {key}"
        self._client = client or httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(
                max_connections=settings.max_concurrency, max_keepalive_connections=settings.max_concurrency
            ),
            timeout=httpx.Timeout(600.0, connect=10.0),
        )
        if client is not None:
            self._client.headers.update(headers)

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        timeout = self.request_timeout_s or timeout_s
        try:
            response = await self._client.post(self._base + endpoint, content=body, timeout=timeout)
        except httpx.TimeoutException:
            return Outcome(OutcomeKind.TIMEOUT, message=f"The backend {self.name} did not answer within {timeout:g}s.")
        except httpx.TransportError as exc:
            return Outcome(
                OutcomeKind.UNAVAILABLE,
                message=f"The backend {self.name} could not be reached: {type(exc).__name__}.",
            )
        except httpx.RequestError as exc:  # e.g. DecodingError: a body its Content-Encoding cannot decode
            return Outcome(
                OutcomeKind.UNAVAILABLE,
                message=f"The backend {self.name} sent an answer that could not be read: {type(exc).__name__}.",
            )
        request_id = response.headers.get("x-request-id")
        parsed = _json_object(response.content)
        if response.is_success:
            if parsed is None:
                return Outcome(
                    OutcomeKind.UNAVAILABLE,
                    status_code=response.status_code,
                    message=f"The backend {self.name} answered {response.status_code} with a body that is not a "
                    "JSON object.",
                )
            # Re-serialised compactly: a pretty-printed body would break the JSONL output.
            return Outcome(
                OutcomeKind.SUCCESS,
                status_code=response.status_code,
                body=orjson.dumps(parsed),
                request_id=request_id,
                usage=Usage.from_response(parsed),
            )
        if parsed is None:
            text = response.content[:_MAX_ERROR_TEXT].decode("utf-8", "replace")
            parsed = {"error": {"message": text, "type": "backend_error", "param": None, "code": None}}
        return Outcome(
            OutcomeKind.HTTP_ERROR,
            status_code=response.status_code,
            body=orjson.dumps(parsed),
            request_id=request_id,
            retry_after_s=parse_retry_after(response.headers.get("retry-after"), time.time()),
            message=f"The backend {self.name} answered {response.status_code}.",
        )

    async def close(self) -> None:
        await self._client.aclose()
