"""OpenAIHttpBackend: any OpenAI-compatible inference server (vLLM, SGLang, llama.cpp server, OpenAI, …)."""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any

import httpx
import orjson

from backfill.config import BackendSettings
from backfill.domain.features import ALL_FEATURES, Feature
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage

_MAX_ERROR_TEXT = 2000
# What each server flavour accepts beyond OpenAI's chat API (images and tools are passed on: the model decides).
_FEATURES = {
    "openai": frozenset({Feature.IMAGES, Feature.TOOLS}),
    "vllm": ALL_FEATURES,
    "sglang": ALL_FEATURES,
    "llamacpp": frozenset({Feature.IMAGES, Feature.TOOLS, Feature.TOP_K}),
}
_CONNECTIONS_PER_POOL = 8


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
        self.features = _FEATURES[settings.flavour]
        self.request_timeout_s = settings.request_timeout_s
        base = settings.url.rstrip("/")
        self._base = base.removesuffix("/v1")
        headers = {"content-type": "application/json"}
        if (key := settings.api_key()) is not None:
            headers["authorization"] = f"Bearer {key}"
        if client is not None:
            client.headers.update(headers)
            self._clients = [client]
        else:
            # httpcore's pool rescans every connection on each request and response, so its CPU cost per request
            # grows with the pool (1.6 ms at 64 connections vs 0.6 ms at 8, bench/http_pool.py). Several small
            # pools, each request on the least busy one, keep the scan short.
            shards = max(1, math.ceil(settings.max_concurrency / _CONNECTIONS_PER_POOL))
            per_pool = math.ceil(settings.max_concurrency / shards)
            self._clients = [
                httpx.AsyncClient(
                    headers=headers,
                    limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                    timeout=httpx.Timeout(600.0, connect=10.0),
                )
                for _ in range(shards)
            ]
        self._busy = [0] * len(self._clients)

    async def _post(self, url: str, body: bytes, timeout_s: float) -> httpx.Response:
        shard = min(range(len(self._clients)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        try:
            return await self._clients[shard].post(url, content=body, timeout=timeout_s)
        finally:
            self._busy[shard] -= 1

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        timeout = self.request_timeout_s or timeout_s
        try:
            response = await self._post(self._base + endpoint, body, timeout)
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
        for client in self._clients:
            await client.aclose()
