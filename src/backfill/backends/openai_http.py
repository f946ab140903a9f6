"""OpenAIHttpBackend: any OpenAI-compatible inference server (vLLM, SGLang, llama.cpp server, OpenAI, …)."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import structlog

from backfill import rawjson
from backfill.config import BackendSettings
from backfill.domain.features import ALL_FEATURES, Feature
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.responses import complete_response
from backfill.domain.result_cache import model_identity
from backfill.domain.usage import Usage
from backfill.errors import BackendTimeout, BackendUnavailable

_MAX_ERROR_TEXT = 2000
# What each server flavour accepts beyond OpenAI's chat API (images and tools are passed on: the model decides).
_FEATURES = {
    "openai": frozenset({Feature.IMAGES, Feature.TOOLS}),
    "vllm": ALL_FEATURES,
    "sglang": ALL_FEATURES,
    "llamacpp": frozenset({Feature.IMAGES, Feature.TOOLS, Feature.TOP_K}),
}
# Idle connections to an engine are closed after this long: before the 5 s after which uvicorn (so vLLM and
# SGLang) closes them, so that a request is never sent on a connection the other side is closing.
_KEEPALIVE_S = 4.0
# Batch lines carry a low engine priority where the engine honours one (DESIGN.md section 5). The top-level
# `priority` field is read on these endpoints by both vLLM and SGLang; vLLM runs lower values first, SGLang (by
# default) higher ones, hence the sign. vLLM refuses a non-zero priority when its scheduling policy is not
# "priority", with a 400 saying "Got priority 10 but Priority scheduling is not enabled."; SGLang ignores it.
_PRIORITY_SIGN = {"vllm": 1, "sglang": -1}
_PRIORITY_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
_PRIORITY_REFUSED = b"priority scheduling is not enabled"

log = structlog.get_logger(__name__)
_PROBE_TIMEOUT_S = 5.0
_MODELS_RETRY_S = 5.0  # how soon a GET /v1/models that got no answer is asked again


def _describe(exc: Exception) -> str:
    """The exception's type and, when it has one, its text ("ConnectError: [Errno 111] Connection refused")."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


RESPONSES_ENDPOINT = "/v1/responses"


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


def with_priority(body: bytes, priority: int) -> bytes:
    """`body`, a JSON object, with `"priority": priority` at its top level. The dispatcher's compact bodies get the
    field spliced in before the closing brace; anything else (the key already there, an empty object, whitespace
    at an edge) is parsed and re-serialised."""
    if body[:1] == b"{" and body[-1:] == b"}" and body[1:2] not in b" \t\r\n}" and b'"priority"' not in body:
        return b'%b,"priority":%d}' % (body[:-1], priority)
    parsed = _json_object(body)
    if parsed is None:
        return body  # not an object: the server refuses it as it would have anyway
    parsed["priority"] = priority
    return orjson.dumps(parsed)


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _read_success(
    content: bytes, endpoint: str, request: bytes
) -> tuple[bytes, Usage, dict[str, rawjson.Raw] | None] | None:
    """A 2xx answer's body to store, its usage and its members unparsed (for splitting a coalesced answer); None
    when it is not a JSON object.

    One line as it came, read shallowly (every value checked, only `usage` parsed): re-serialising it cost as much
    as parsing it, and an embedding is thousands of floats. Re-serialised compactly when it spans lines, which
    would break the JSONL output (inside a string JSON escapes line breaks), and for the Responses API, whose
    answer is completed from the request."""
    stripped = content.strip()
    if endpoint != RESPONSES_ENDPOINT and b"\n" not in stripped and b"\r" not in stripped:
        members = rawjson.read_object(stripped)
        if members is None:
            return None
        usage = members.get("usage")  # read_object checked it: it parses
        return stripped, Usage.from_response({"usage": rawjson.parse(usage) if usage is not None else None}), members
    parsed = _json_object(content)
    if parsed is None:
        return None
    if endpoint == RESPONSES_ENDPOINT:
        parsed = complete_response(parsed, _json_object(request))
    return orjson.dumps(parsed), Usage.from_response(parsed), None


@dataclass(frozen=True, slots=True)
class _Answer:
    """A batch line's answer, read whole."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive (both clients' header maps are)
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class UpstreamAnswer:
    """A backend's answer to an interactive request: status and headers now, the body as it arrives."""

    def __init__(self, backend: str, response: aiohttp.ClientResponse) -> None:
        self.backend = backend
        self.status_code = response.status
        self.headers: dict[str, str] = {name.lower(): value for name, value in response.headers.items()}
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes exactly as sent (no decoding) as they arrive; raises BackendTimeout or
        BackendUnavailable. Bytes that arrive together with the connection's reset are lost (aiohttp raises before
        handing them over): a stream that breaks off ends a little earlier than it did."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise BackendTimeout(f"The backend {self.backend} stopped sending its answer.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"The backend {self.backend} broke off: {type(exc).__name__}.") from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        """Close the connection if the body was not read to its end (the server sees the client leave); else
        keep it for the next request."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class OpenAIHttpBackend:
    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient | None = None) -> None:
        self.name = settings.name
        self.models = frozenset(settings.models)
        self.max_concurrency = settings.max_concurrency
        self.features = _FEATURES[settings.flavour]
        self.request_timeout_s = settings.request_timeout_s
        sign = _PRIORITY_SIGN.get(settings.flavour, 0)
        self._priority = sign * settings.batch_priority
        self._priority_mode: Literal["auto", "on", "off"] = settings.priority if self._priority else "off"
        # Only vLLM refuses a priority it would not honour, so only there does an accepted line prove support.
        self._accepted_proves_priority = settings.flavour == "vllm"
        # Whether batch lines reach this server with an engine priority it honours; None: not known yet.
        self.priority_enabled: bool | None = {"on": True, "off": False, "auto": None}[self._priority_mode]
        base = settings.url.rstrip("/")
        self._base = base.removesuffix("/v1")
        headers = {"content-type": "application/json"}
        if (key := settings.api_key()) is not None:
            headers["authorization"] = f"Bearer {key}"
        self._headers = headers
        # Batch lines go through aiohttp: its client costs an eighth of httpx's CPU a request (~0.1 vs ~0.8 ms at
        # 8 connections, bench/http_pool.py), and the HTTP client was two thirds of the server's CPU a chat line.
        # The session is made on first use (it belongs to the running loop). An injected httpx client (an
        # in-process upstream in tests) carries batch lines and GET /v1/models instead; interactive streams always
        # go through aiohttp.
        self._batch: aiohttp.ClientSession | None = None
        self._injected = client
        if client is not None:
            client.headers.update(headers)
        # Interactive requests (the proxy's streams) get connections of their own, as many as there are streams:
        # they never wait for a connection a batch line holds.
        self._streams: aiohttp.ClientSession | None = None
        # GET /v1/models (probes, the result cache's model identity): rare, through httpx.
        self._control = client or httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0))
        self._flavour, self._revision = settings.flavour, settings.model_revision
        self._identity_ttl_s = settings.model_identity_ttl_s
        self._described: asyncio.Task[dict[str, dict[str, Any]] | None] | None = None
        self._described_until = 0.0

    def _session(self) -> aiohttp.ClientSession:
        """The batch lines' connections: up to `max_concurrency`, an idle one closed after `_KEEPALIVE_S`."""
        if self._batch is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_concurrency, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S
            )
            self._batch = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self._batch

    def _stream_session(self) -> aiohttp.ClientSession:
        """The interactive requests' connections: no limit on how many; bodies passed on as they come (no
        decompression, and `accept-encoding: identity` asked)."""
        if self._streams is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
            headers = {**self._headers, "accept-encoding": "identity"}
            self._streams = aiohttp.ClientSession(headers=headers, connector=connector, auto_decompress=False)
        return self._streams

    async def _post(self, url: str, body: bytes, timeout_s: float) -> _Answer | Outcome:
        """POST a batch line's body: its status, headers and body, or the outcome of not getting them."""
        if self._injected is not None:
            return await self._post_injected(url, body, timeout_s)
        # As httpx's timeout did: waiting for a connection, connecting, and then each read, not the whole answer.
        timeout = aiohttp.ClientTimeout(connect=timeout_s, sock_connect=min(timeout_s, 10.0), sock_read=timeout_s)
        try:
            async with self._session().post(url, data=body, timeout=timeout) as response:
                return _Answer(response.status, response.headers, await response.read())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return self._unreachable(_describe(exc))
        except TimeoutError:
            return self._timed_out(timeout_s)
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            return self._unreadable(exc)
        except aiohttp.ClientError as exc:  # the connection broke: ServerDisconnectedError, ClientOSError
            return self._broke_off(exc)

    async def _post_injected(self, url: str, body: bytes, timeout_s: float) -> _Answer | Outcome:
        assert self._injected is not None
        try:
            response = await self._injected.post(url, content=body, timeout=timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return self._unreachable(_describe(exc))
        except httpx.TimeoutException:
            return self._timed_out(timeout_s)
        except httpx.TransportError as exc:
            return self._broke_off(exc)
        except httpx.RequestError as exc:  # e.g. DecodingError: a body its Content-Encoding cannot decode
            return self._unreadable(exc)
        return _Answer(response.status_code, response.headers, response.content)

    def _unreachable(self, why: str) -> Outcome:
        self._described_until = 0.0  # down: it may come back with other weights (the result cache asks again)
        return Outcome(
            OutcomeKind.UNAVAILABLE, message=f"The backend {self.name} could not be reached: {why}.", unreachable=True
        )

    def _timed_out(self, timeout_s: float) -> Outcome:
        return Outcome(OutcomeKind.TIMEOUT, message=f"The backend {self.name} did not answer within {timeout_s:g}s.")

    def _broke_off(self, exc: Exception) -> Outcome:
        return Outcome(
            OutcomeKind.UNAVAILABLE, message=f"The backend {self.name} could not be reached: {type(exc).__name__}."
        )

    def _unreadable(self, exc: Exception) -> Outcome:
        return Outcome(
            OutcomeKind.UNAVAILABLE,
            message=f"The backend {self.name} sent an answer that could not be read: {type(exc).__name__}.",
        )

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        """Run one batch line, with the engine priority batch work gets where it has one."""
        if endpoint not in _PRIORITY_ENDPOINTS or self._priority_mode == "off" or self.priority_enabled is False:
            return await self._send(endpoint, body, timeout_s)
        outcome = await self._send(endpoint, with_priority(body, self._priority), timeout_s)
        if self._priority_mode != "auto":
            return outcome
        if outcome.kind is OutcomeKind.SUCCESS and self._accepted_proves_priority:
            self.priority_enabled = True
        elif self._is_priority_refused(outcome):
            self._stop_sending_priority()
            # The same line again at once, as it came: the refusal was ours, not the line's.
            return await self._send(endpoint, body, timeout_s)
        return outcome

    @staticmethod
    def _is_priority_refused(outcome: Outcome) -> bool:
        return (
            outcome.kind is OutcomeKind.HTTP_ERROR
            and outcome.status_code == 400
            and outcome.body is not None
            and _PRIORITY_REFUSED in outcome.body.lower()
        )

    def _stop_sending_priority(self) -> None:
        """Lines refused together come back one by one: only the first is logged."""
        if self.priority_enabled is not False:
            self.priority_enabled = False
            log.info("backend.priority_not_enabled", backend=self.name, detail="batch lines go without a priority")

    async def _send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        response = await self._post(self._base + endpoint, body, self.request_timeout_s or timeout_s)
        if isinstance(response, Outcome):
            return response
        request_id = response.headers.get("x-request-id")
        if response.is_success:
            read = _read_success(response.content, endpoint, body)
            if read is None:
                return Outcome(
                    OutcomeKind.UNAVAILABLE,
                    status_code=response.status_code,
                    message=f"The backend {self.name} answered {response.status_code} with a body that is not a "
                    "JSON object.",
                )
            content, usage, answer = read
            return Outcome(
                OutcomeKind.SUCCESS,
                status_code=response.status_code,
                body=content,
                request_id=request_id,
                usage=usage,
                answer=answer,
            )
        parsed = _json_object(response.content)
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

    async def open_stream(self, endpoint: str, body: bytes, timeout_s: float) -> UpstreamAnswer:
        """POST an interactive request's body unchanged and return once the answer's headers are in.

        `timeout_s` (or the backend's own request timeout) bounds the wait for each piece of the answer, not the
        whole of a stream. The caller must `aclose()` the answer. Raises BackendTimeout or BackendUnavailable.
        """
        timeout = self.request_timeout_s or timeout_s
        pieces = aiohttp.ClientTimeout(connect=timeout, sock_connect=min(timeout, 10.0), sock_read=timeout)
        try:
            response = await self._stream_session().post(self._base + endpoint, data=body, timeout=pieces)
        except TimeoutError:
            raise BackendTimeout(f"The backend {self.name} did not answer within {timeout:g}s.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"The backend {self.name} could not be reached: {type(exc).__name__}.") from None
        return UpstreamAnswer(self.name, response)

    async def probe(self) -> str | None:
        """Whether the server answers at all (any answer below 500 to GET /v1/models): None if it does, else
        why not. It has a client of its own, never waiting behind batch lines."""
        try:
            response = await self._control.get(self._base + "/v1/models", timeout=_PROBE_TIMEOUT_S)
        except httpx.TimeoutException:
            return f"The backend {self.name} did not answer within {_PROBE_TIMEOUT_S:g}s."
        except httpx.HTTPError as exc:
            return f"The backend {self.name} could not be reached: {_describe(exc)}."
        if response.status_code >= 500:
            return f"The backend {self.name} answered {response.status_code}."
        return None

    async def model_identity(self, model: str) -> str | None:
        """What GET /v1/models says of `model` (its entry, less its start time) and the configured `model_revision`
        (domain.result_cache). A server without /v1/models (404) is known by the revision alone; one that does not
        answer is not known now (None)."""
        now = time.monotonic()
        if self._described is None or (self._described.done() and now >= self._described_until):
            self._described = asyncio.ensure_future(self._describe_models())
        described = await asyncio.shield(self._described)
        if described is None:
            return None
        return model_identity(described.get(model), flavour=self._flavour, revision=self._revision)

    async def _describe_models(self) -> dict[str, dict[str, Any]] | None:
        """Each model's entry in GET /v1/models by id ({} for a server without the route); None: no answer."""
        self._described_until = time.monotonic() + _MODELS_RETRY_S
        try:
            response = await self._control.get(self._base + "/v1/models", timeout=_PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        if response.status_code == 404:
            described: dict[str, dict[str, Any]] | None = {}
        elif response.status_code != 200:
            described = None
        else:
            entries = (_json_object(response.content) or {}).get("data")
            described = {
                entry["id"]: entry
                for entry in (entries if isinstance(entries, list) else [])
                if isinstance(entry, dict) and isinstance(entry.get("id"), str)
            }
        if described is not None:
            self._described_until = time.monotonic() + self._identity_ttl_s
        return described

    async def close(self) -> None:
        for session in (self._batch, self._streams):
            if session is not None:
                await session.close()
        await self._control.aclose()
