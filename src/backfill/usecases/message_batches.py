"""Message Batches API use cases (SPEC §4), on the store, validation and dispatcher that OpenAI batches use.

Create reads the body (spooled to a file) twice, one request at a time: once to check the envelope and find the
batch's model, then to translate each request and write the chat-completions input lines of those that can run to
the blob store (an empty line holds the place of each that cannot). The batch row, its refused requests and its
runnable lines then go in through the same `start_batch` (quota check, scheduling estimates) as an OpenAI batch,
so both APIs share tenants, quotas and the scheduler, and the dispatcher needs to know nothing about Anthropic.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import orjson

from backfill import ids
from backfill.domain.batches import Batch, BatchApi, BatchStatus
from backfill.domain.features import ALL_FEATURES, Feature, common_features
from backfill.domain.files import MESSAGE_BATCH_PURPOSE, FileRecord
from backfill.domain.lines import FileValidator, RawLine, ValidationLimits
from backfill.domain.message_batch_body import RawRequest, split_requests
from backfill.domain.message_batches import (
    CHAT_ENDPOINT,
    RefusedRequest,
    UnrunCounts,
    archive_at,
    check_count,
    parse_request,
    plan_request,
    result_line,
    rfc3339,
    served_model,
)
from backfill.domain.valid_lines import ValidLine
from backfill.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, TokenLimitExceeded, TokenRateExceeded
from backfill.ports import Backend, BlobWriter, DeclaresFeatures
from backfill.usecases.deps import MessageBatchDeps

_CHUNK_BYTES = 1 << 16
_READ_BYTES = 1 << 20  # of a spooled create body


@dataclass(frozen=True)
class Shown:
    """A message batch with what its MessageBatch object needs besides the row."""

    batch: Batch
    unrun: UnrunCounts


def features_of(backends: Sequence[Backend], model: str) -> frozenset[Feature]:
    """What every backend serving `model` accepts (one that declares nothing is taken to accept everything)."""
    return common_features(
        backend.features if isinstance(backend, DeclaresFeatures) else ALL_FEATURES
        for backend in backends
        if model in backend.models
    )


@dataclass(frozen=True)
class _Rules:
    """What translating a create body needs to know of this server, in a form a worker process can be sent."""

    served: frozenset[str]
    features: dict[str, frozenset[Feature]]  # of each served model: what every backend serving it accepts
    max_requests: int
    max_line_bytes: int

    @classmethod
    def of(cls, deps: MessageBatchDeps) -> _Rules:
        served = frozenset(model for backend in deps.backends for model in backend.models if deps.is_served(model))
        return cls(
            served=served,
            features={model: features_of(deps.backends, model) for model in served},
            max_requests=deps.settings.message_batch_max_requests,
            max_line_bytes=deps.settings.max_line_bytes,
        )


@dataclass(frozen=True)
class _Survey:
    """What the first pass over a create body learns: the batch's model, and where each request lies."""

    model: str | None  # the first served model a request names (None: no request can run)
    places: list[tuple[int, int]]  # (offset, length) of each request in the body


@dataclass(frozen=True)
class Translation:
    """A create body (or a Gemini batch's requests) translated: its model, the input lines that can run, the
    requests that cannot."""

    model: str | None
    lines: Sequence[ValidLine]
    refused: list[RefusedRequest]


class _Sink(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...


def _chunks(body: BinaryIO) -> Iterator[bytes]:
    body.seek(0)
    while chunk := body.read(_READ_BYTES):
        yield chunk


def _parsed(raw: RawRequest, max_request_bytes: int) -> Any:
    if raw.data is None:
        raise InvalidRequest(
            f"requests.{raw.index}: this request is {raw.length} bytes, more than the maximum of {max_request_bytes}.",
            param=f"requests.{raw.index}",
        )
    try:
        return orjson.loads(raw.data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: requests.{raw.index}: {exc.msg}.", param=f"requests.{raw.index}"
        ) from None


def _survey(rules: _Rules, body: BinaryIO) -> _Survey:
    """First pass, one request at a time: the envelope is checked (400, before anything is stored)."""
    seen: set[str] = set()
    places: list[tuple[int, int]] = []
    model: str | None = None
    count = 0
    for raw in split_requests(_chunks(body), rules.max_line_bytes):
        count += 1
        if count > rules.max_requests:
            continue  # only counted, for the message
        request = parse_request(raw.index, _parsed(raw, rules.max_line_bytes), seen)
        if model is None:
            model = served_model(request, rules.served.__contains__)
        places.append((raw.offset, raw.length))
    check_count(count, rules.max_requests)
    return _Survey(model, places)


def _write_lines(rules: _Rules, body: BinaryIO, survey: _Survey, sink: _Sink) -> Translation:
    """Second pass: write line i+1 for request i, its input line or an empty line in the place of a request that
    cannot run. Each written line goes through the validator OpenAI batch files go through; a line it refuses is a
    request that cannot run either."""
    is_served = rules.served.__contains__
    features = rules.features.get(survey.model, frozenset()) if survey.model is not None else frozenset()
    limits = ValidationLimits(
        max_lines=max(1, len(survey.places)), max_line_bytes=rules.max_line_bytes, max_reported_errors=1
    )
    validator = FileValidator(CHAT_ENDPOINT, is_served, limits)
    refused: list[RefusedRequest] = []
    seen: set[str] = set()
    for index, (offset, length) in enumerate(survey.places):
        body.seek(offset)
        request = parse_request(index, orjson.loads(body.read(length)), seen)
        planned = plan_request(index, request, survey.model, is_served, features)
        number, line_offset = index + 1, sink.size
        if planned.line is None:
            sink.write(b"\n")
            refused.append(RefusedRequest(number, request.custom_id, line_offset, planned.refusal or "Cannot run."))
            continue
        sink.write(planned.line + b"\n")
        size = len(planned.line)
        error = validator.feed(
            RawLine(number, line_offset, size, planned.line if size <= limits.max_line_bytes else None)
        )
        if error is not None:
            refused.append(RefusedRequest(number, request.custom_id, line_offset, f"params: {error.message}"))
    return Translation(survey.model, validator.passed(), refused)


def _translate(rules: _Rules, body: BinaryIO, sink: _Sink) -> Translation:
    """Both passes (a 400 from the first leaves the sink untouched)."""
    return _write_lines(rules, body, _survey(rules, body), sink)


class _FileSink:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)


def translate_file(rules: _Rules, body_path: str, lines_path: str) -> Translation:
    """`_translate` in a worker process: the body read from its spool file, the input lines written to a file of
    their own, that the calling process copies to the blob store. The lines come back as the validator's typed
    columns (`LineColumns`): a list of 100,000 objects would unpickle in one C call that holds the GIL, and so the
    event loop, for a fifth of a second; the columns take milliseconds."""
    with open(body_path, "rb") as body, open(lines_path, "wb") as lines:
        return _translate(rules, body, _FileSink(lines))


def _copy(path: str, writer: BlobWriter) -> None:
    with open(path, "rb") as lines:
        while chunk := lines.read(_READ_BYTES):
            writer.write(chunk)


async def _translated(deps: MessageBatchDeps, body: BinaryIO, writer: BlobWriter) -> Translation:
    """The body translated, its input lines written to `writer`. A body of `message_batch_offload_bytes` or more
    is translated in a worker process: the walk is CPU-bound for seconds, and in a thread it would share the GIL
    with the event loop (four maximal creates at once held /healthz for 0.7 s); smaller ones in a thread."""
    rules = _Rules.of(deps)
    size = body.seek(0, os.SEEK_END)
    name = getattr(body, "name", None)
    if size < deps.settings.message_batch_offload_bytes or not isinstance(name, str):
        return await asyncio.to_thread(_translate, rules, body, writer)
    lines = await asyncio.to_thread(tempfile.NamedTemporaryFile, dir=os.path.dirname(name), prefix="lines-")
    try:
        translation = await deps.offload(translate_file, rules, name, lines.name)
        await asyncio.to_thread(_copy, lines.name, writer)
    finally:
        await asyncio.to_thread(lines.close)  # removing a file this large blocks for a while
    return translation


async def create_message_batch(deps: MessageBatchDeps, tenant_id: str, body: BinaryIO) -> Shown:
    """Check the envelope (400), translate, store and start the batch; refused requests end `errored`.

    `body` is the create call's body in a file: read twice, one request at a time, so that memory holds one
    request and not the whole body (which may be `message_batch_max_bytes`)."""
    batch_id, file_id = ids.message_batch_id(), ids.file_id()
    writer = deps.blobs.open_writer(f"files/{file_id}")
    try:
        translation = await _translated(deps, body, writer)
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    await start_translated(deps, tenant_id, batch_id, file_id, writer.size, translation, BatchApi.ANTHROPIC)
    return await get_message_batch(deps, tenant_id, batch_id)


async def start_translated(
    deps: MessageBatchDeps,
    tenant_id: str,
    batch_id: str,
    file_id: str,
    size: int,
    translation: Translation,
    api: BatchApi,
    metadata: dict[str, str] | None = None,
    endpoint: str = CHAT_ENDPOINT,
) -> None:
    """Register the translated input lines (already committed under `files/{file_id}`, `size` bytes) and start
    the batch on them, as a message batch (or Gemini batch, by `api`) whose refused requests end failed."""
    settings, store = deps.settings, deps.store
    now = deps.now()
    model, lines, refused = translation.model, translation.lines, translation.refused
    record = FileRecord(
        id=file_id,
        tenant_id=tenant_id,
        filename=f"{batch_id}_requests.jsonl",
        purpose=MESSAGE_BATCH_PURPOSE,
        bytes=size,
        blob_key=f"files/{file_id}",
        created_at=now,
        expires_at=now + settings.message_batch_retention_s,  # the file sweep removes it when results go
    )
    batch = Batch(
        id=batch_id,
        tenant_id=tenant_id,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=f"{settings.message_batch_window_s}s",
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + settings.message_batch_window_s,
        metadata=metadata,
        model=model,
        api=api,
    )
    # Claimed while it is started here, so no dispatcher validates it meanwhile; should this process die before
    # it starts, the claim lapses and a dispatcher validates the input file like an OpenAI batch's.
    owner = ids.owner_id()
    try:
        await store.add_file(record)
        await store.add_message_batch(batch, refused, owner, deps.clock() + settings.lease_ttl_s)
        await store.start_batch(batch_id, owner, model, lines, now, token_limit=await _token_limit(deps, tenant_id))
    except BaseException as exc:
        with contextlib.suppress(Exception):  # best effort: what is left is swept when the file expires
            await store.discard_batch(batch_id)
            await store.delete_file(tenant_id, file_id)
        await deps.blobs.delete(record.blob_key)
        if isinstance(exc, TokenLimitExceeded):
            retry_after_s = 60 if isinstance(exc, TokenRateExceeded) else None
            raise QuotaExceeded(exc.message, code="token_limit_exceeded", retry_after_s=retry_after_s) from None
        raise
    await store.release_batch(batch_id, owner)


async def _token_limit(deps: MessageBatchDeps, tenant_id: str) -> int | None:
    limit = await deps.store.tenant_token_limit(tenant_id)
    return limit if limit is not None else deps.settings.default_enqueued_token_limit


async def _shown(deps: MessageBatchDeps, batches: list[Batch]) -> list[Shown]:
    """Record archiving that has come due (results are kept `message_batch_retention_s` after creation)."""
    now = deps.clock()
    for batch in batches:
        due = archive_at(batch, deps.settings.message_batch_retention_s, now)
        if due is not None:
            await deps.store.archive_batch(batch.id, due)
            batch.archived_at = due
    unrun = await deps.store.unrun_counts([batch.id for batch in batches])
    return [Shown(batch, unrun.get(batch.id, UnrunCounts())) for batch in batches]


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such message batch: {batch_id}")


async def get_message_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> Shown:
    batch = await deps.store.get_batch(tenant_id, batch_id, BatchApi.ANTHROPIC)
    if batch is None:
        raise _not_found(batch_id)
    return (await _shown(deps, [batch]))[0]


async def list_message_batches(
    deps: MessageBatchDeps, tenant_id: str, *, limit: int, before_id: str | None, after_id: str | None
) -> tuple[list[Shown], bool]:
    if before_id is not None and after_id is not None:
        raise InvalidRequest("Pass at most one of 'before_id' and 'after_id'.", param="before_id")
    cursor = before_id or after_id
    page = None
    if cursor is None or "\x00" not in cursor:  # PostgreSQL text cannot hold NUL: no id has one
        page = await deps.store.list_message_batches(tenant_id, limit=limit, before_id=before_id, after_id=after_id)
    if page is None:
        name = "before_id" if before_id is not None else "after_id"
        raise InvalidRequest(f"Invalid '{name}': no message batch {cursor!r}.", param=name)
    batches, has_more = page
    return await _shown(deps, batches), has_more


async def cancel_message_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> Shown:
    """Remaining requests end `canceled` (in-flight ones after a grace period); the batch then ends."""
    try:
        await deps.store.request_cancel(tenant_id, batch_id, deps.now(), BatchApi.ANTHROPIC)
    except NotFound:
        raise _not_found(batch_id) from None
    except Conflict:
        raise Conflict(f"Message batch {batch_id} has already ended; there is nothing left to cancel.") from None
    return await get_message_batch(deps, tenant_id, batch_id)


async def delete_message_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> str:
    """Remove an ended batch with its results and its input file."""
    if "\x00" in batch_id:
        raise _not_found(batch_id)
    batch = await deps.store.delete_message_batch(tenant_id, batch_id)
    with contextlib.suppress(NotFound):  # already swept at the end of retention
        record = await deps.store.delete_file(tenant_id, batch.input_file_id)
        await deps.blobs.delete(record.blob_key)
    return batch.id


async def message_batch_results(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> AsyncIterator[bytes]:
    """The results stream, one line per request in request order; checked before the first byte is sent."""
    shown = await get_message_batch(deps, tenant_id, batch_id)
    batch = shown.batch
    if not batch.status.is_terminal:
        raise Conflict(f"Message batch {batch_id} is still processing: results are ready once it has ended.")
    if batch.archived_at is not None:
        raise NotFound(
            f"The results of message batch {batch_id} were archived at {rfc3339(batch.archived_at)} and are no "
            "longer available."
        )
    return _stream_results(deps, batch)


async def _stream_results(deps: MessageBatchDeps, batch: Batch) -> AsyncIterator[bytes]:
    chunk = bytearray()
    async for result in deps.store.iter_results(batch.id):
        chunk += result_line(result, batch.model)
        if len(chunk) >= _CHUNK_BYTES:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)
