"""Background Responses calls and flex calls (docs/flex.md), run as one-line batches.

Each is stored and started through `start_translated`, as message batches and Gemini batches are, with a
24-hour window: the dispatcher runs it at batch priority in harvested capacity, with retries and crash safety,
and knows nothing about it. Its id (`resp_…`) is its batch's id; `BatchApi.RESPONSES` (background) and
`BatchApi.FLEX` keep both out of /v1/batches. A flex caller waits for the line by reading it from the store —
every ~50 ms at first, backing off to once a second — since the worker that runs it may be another process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from backfill import ids
from backfill.domain import background
from backfill.domain.batches import Batch, BatchApi, RequestState
from backfill.domain.lines import FileValidator, RawLine, ValidationLimits
from backfill.domain.results import StoredResult
from backfill.errors import Conflict, FlexUnavailable, InvalidRequest, NotFound
from backfill.usecases.deps import MessageBatchDeps
from backfill.usecases.message_batches import Translation, start_translated

FIRST_POLL_S, LAST_POLL_S = 0.05, 1.0
ECHO = "echo"  # the batch metadata key that keeps what the Response object echoes of the request


async def submit(deps: MessageBatchDeps, tenant_id: str, endpoint: str, body: dict[str, Any], api: BatchApi) -> str:
    """Store `body` as a one-line batch of `endpoint` and start it; its id. 400/404 for a request that cannot run."""
    model = body.get("model")
    if not isinstance(model, str) or not deps.is_served(model):
        served = sorted({name for backend in deps.backends for name in backend.models if deps.is_served(name)})
        raise NotFound(
            f"The model `{model}` does not exist or is not served here. Served models: {', '.join(served) or 'none'}.",
            param="model",
            code="model_not_found",
        )
    line = background.input_line(endpoint, body)
    limits = ValidationLimits(max_lines=1, max_line_bytes=deps.settings.max_line_bytes, max_reported_errors=1)
    validator = FileValidator(endpoint, deps.is_served, limits)
    error = validator.feed(RawLine(1, 0, len(line), line if len(line) <= limits.max_line_bytes else None))
    if error is not None:
        raise InvalidRequest(error.message, param=(error.param or "").removeprefix("body.") or None)
    batch_id, file_id = ids.response_id(), ids.file_id()
    writer = deps.blobs.open_writer(f"files/{file_id}")
    try:
        writer.write(line + b"\n")
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    translation = Translation(model, validator.passed(), [])
    metadata = {ECHO: background.echo_of(body)}
    await start_translated(deps, tenant_id, batch_id, file_id, writer.size, translation, api, metadata, endpoint)
    return batch_id


async def _line(deps: MessageBatchDeps, batch_id: str) -> StoredResult:
    async for result in deps.store.iter_results(batch_id):
        return result
    raise NotFound(f"No response found with id '{batch_id}'.")


async def _find(deps: MessageBatchDeps, tenant_id: str, response_id: str) -> Batch:
    batch = None
    if response_id.startswith("resp_") and "\x00" not in response_id:
        batch = await deps.store.get_batch(tenant_id, response_id, BatchApi.RESPONSES)
    if batch is None:
        raise NotFound(f"No response found with id '{response_id}'.")
    return batch


async def get_response(deps: MessageBatchDeps, tenant_id: str, response_id: str) -> dict[str, Any]:
    """`GET /v1/responses/{id}`: the Response object of a background call of this tenant (404 otherwise)."""
    batch = await _find(deps, tenant_id, response_id)
    return _shown(batch, await _line(deps, batch.id))


def _shown(batch: Batch, line: StoredResult) -> dict[str, Any]:
    echo = (batch.metadata or {}).get(ECHO, "")
    return background.response_object(batch.id, batch.created_at, batch.model or "", batch.status, line, echo)


async def cancel_response(deps: MessageBatchDeps, tenant_id: str, response_id: str) -> dict[str, Any]:
    """`POST /v1/responses/{id}/cancel`: the call stops (in flight, after the cancel grace); one that has finished
    cannot be cancelled (400), one already cancelled is answered as it is."""
    batch = await _find(deps, tenant_id, response_id)
    line = await _line(deps, batch.id)
    status = background.response_status(batch.status, line)
    if status == "cancelled":
        return _shown(batch, line)
    if background.is_finished(line):
        raise InvalidRequest(f"Cannot cancel a response with status '{status}'.")
    with contextlib.suppress(Conflict):  # it ended meanwhile: show how
        await deps.store.request_cancel(tenant_id, batch.id, deps.now(), BatchApi.RESPONSES)
    return await get_response(deps, tenant_id, response_id)


async def await_flex(
    deps: MessageBatchDeps, tenant_id: str, batch_id: str, timeout_s: float, clock: Callable[[], float]
) -> StoredResult:
    """The flex line once it has finished. Still queued after `timeout_s` (no capacity took it), it is cancelled
    and FlexUnavailable raised. A leased line may be running, or only waiting in a worker for a slot (the store
    cannot tell): it gets `request_timeout_s` more, one try's worth, before the same."""
    deadline = clock() + timeout_s
    last_chance = deadline + deps.settings.request_timeout_s
    delay = FIRST_POLL_S
    while True:
        line = await _line(deps, batch_id)
        if background.is_finished(line):
            return line
        now = clock()
        if now >= last_chance or (now >= deadline and line.state is RequestState.QUEUED):
            await cancel_quietly(deps, tenant_id, batch_id)
            raise FlexUnavailable(
                f"No capacity was free to run this flex request within {timeout_s:g} s; retry later, or send it "
                "without `service_tier: flex`.",
                retry_after_s=max(1, round(min(timeout_s, 60.0))),
            )
        await asyncio.sleep(min(delay, max(0.01, (deadline if now < deadline else last_chance) - now)))
        delay = min(LAST_POLL_S, delay * 2)


async def cancel_quietly(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> None:
    """Give up a flex line (its caller left or its time ran out); nothing to do if it already ended."""
    with contextlib.suppress(Conflict, NotFound):
        await deps.store.request_cancel(tenant_id, batch_id, deps.now(), BatchApi.FLEX)
