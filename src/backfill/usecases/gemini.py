"""Gemini Batch API use cases (docs/gemini.md), on the machinery message batches run on.

A create call's requests — inline, or the lines of an uploaded file — are translated one at a time into
chat-completions input lines (an empty line in the place of each that cannot run), stored like a message batch's
and started through the same `start_translated`: tenants, quotas, the scheduler, harvest, retries and crash
safety are the same for all three APIs, and the dispatcher knows nothing about Gemini.

Uploads use Google's resumable protocol: a start call opens a session, chunks are appended in order, the last
one finalizes it. A session lives in the process that opened it (`UploadSessions`); the SDK sends every chunk of
an upload to the URL that process answered with, so a deployment with several API replicas needs sticky routing
for `/gemini/upload/` (docs/gemini.md).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backfill import ids
from backfill.domain import gemini
from backfill.domain.anthropic import Untranslatable
from backfill.domain.batches import Batch, BatchApi
from backfill.domain.features import Feature
from backfill.domain.files import FileRecord
from backfill.domain.lines import FileValidator, RawLine, ValidationLimits
from backfill.domain.message_batches import CHAT_ENDPOINT, RefusedRequest, UnrunCounts
from backfill.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from backfill.ports import BlobWriter
from backfill.usecases.deps import FileDeps, MessageBatchDeps
from backfill.usecases.message_batches import Translation, features_of, start_translated

GEMINI_PURPOSE = "gemini"  # uploads through the Gemini Files API: JSONL of {key, request} lines
SOURCE_INLINE, SOURCE_FILE = "inline", "file"
UPLOAD_SESSION_TTL_S = 3600


@dataclass(frozen=True)
class Shown:
    """A Gemini batch with what its Operation needs besides the row."""

    batch: Batch
    unrun: UnrunCounts
    output: dict[str, Any] | None  # once it has ended: inlinedResponses or responsesFile

    def operation(self) -> dict[str, Any]:
        metadata = self.batch.metadata or {}
        return gemini.operation(self.batch, self.unrun, self.output, metadata.get("display_name"))


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"Batch batches/{batch_id} not found.")


# --- create -----------------------------------------------------------------------------------------------


def _translate(
    requests: Iterable[gemini.GeminiRequest],
    model: str,
    features: frozenset[Feature],
    limits: ValidationLimits,
    sink: BlobWriter,
    endpoint: str,
) -> Translation:
    """Write line i+1 for request i: its input line, or an empty line in the place of a request that cannot run.
    Each written line goes through the validator OpenAI batch files go through. One request at a time."""
    validator = FileValidator(endpoint, lambda name: name == model, limits)
    refused: list[RefusedRequest] = []
    for request in requests:
        number, offset = request.index + 1, sink.size
        try:
            if endpoint == gemini.EMBEDDINGS_ENDPOINT:
                body = gemini.to_embeddings(request.request, model)
            else:
                body = gemini.to_chat(request.request, model, features)
            line = gemini.input_line(request, body, endpoint)
        except Untranslatable as exc:
            sink.write(b"\n")
            refused.append(RefusedRequest(number, request.custom_id, offset, str(exc)))
            continue
        sink.write(line + b"\n")
        size = len(line)
        error = validator.feed(RawLine(number, offset, size, line if size <= limits.max_line_bytes else None))
        if error is not None:
            refused.append(RefusedRequest(number, request.custom_id, offset, f"request: {error.message}"))
    return Translation(model, validator.passed(), refused)


def _file_lines(deps: FileDeps, record: FileRecord, max_requests: int) -> Iterator[gemini.GeminiRequest]:
    """The requests of an uploaded JSONL file, read in chunks (blocking: for a worker thread)."""
    pending = b""
    index = 0

    def request_of(line: bytes) -> gemini.GeminiRequest | None:
        nonlocal index
        line = line.strip()
        if index == 0:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line:
            return None
        if index >= max_requests:
            raise InvalidRequest(f"The input file holds more than {max_requests} requests.")
        request = gemini.file_request(index, line)
        index += 1
        return request

    for chunk in deps.blobs.iter_chunks(record.blob_key):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if (request := request_of(line)) is not None:
                yield request
    if (request := request_of(pending)) is not None:
        yield request
    if index == 0:
        raise InvalidRequest(f"The input file files/{record.id} holds no requests.")


async def create_batch(
    deps: MessageBatchDeps, tenant_id: str, model_name: str, payload: Any, endpoint: str = CHAT_ENDPOINT
) -> Shown:
    """`models/{model}:batchGenerateContent` (or, for `endpoint` /v1/embeddings, `:asyncBatchEmbedContent`):
    check the call (400/404), translate, store and start the batch."""
    source = gemini.parse_create(payload)
    model = gemini.model_of(model_name)
    if not model or not deps.is_served(model):
        served = sorted({name for backend in deps.backends for name in backend.models if deps.is_served(name)})
        raise NotFound(f"models/{model} is not served here. Served models: {', '.join(served) or 'none'}.")
    settings = deps.settings
    requests: Iterable[gemini.GeminiRequest]
    if source.inline is not None:
        if len(source.inline) > settings.message_batch_max_requests:
            raise InvalidRequest(
                f"batch.inputConfig.requests.requests: at most {settings.message_batch_max_requests} requests, "
                f"not {len(source.inline)}."
            )
        requests = [gemini.inline_request(index, item) for index, item in enumerate(source.inline)]
    else:
        record = await deps.store.get_file(tenant_id, source.file_id or "")
        if record is None:
            raise NotFound(f"File files/{source.file_id} not found.")
        requests = _file_lines(deps, record, settings.max_lines)
    batch_id, file_id = ids.gemini_batch_id(), ids.file_id()
    writer = deps.blobs.open_writer(f"files/{file_id}")
    try:
        limits = ValidationLimits(
            max_lines=settings.max_lines, max_line_bytes=settings.max_line_bytes, max_reported_errors=1
        )
        features = features_of(deps.backends, model)
        translation = await asyncio.to_thread(_translate, requests, model, features, limits, writer, endpoint)
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    metadata = {"source": SOURCE_INLINE if source.inline is not None else SOURCE_FILE}
    if source.display_name:
        metadata["display_name"] = source.display_name
    await start_translated(
        deps, tenant_id, batch_id, file_id, writer.size, translation, BatchApi.GEMINI, metadata, endpoint
    )
    return await get_batch(deps, tenant_id, batch_id)


# --- read -------------------------------------------------------------------------------------------------


async def _output(deps: MessageBatchDeps, batch: Batch) -> dict[str, Any] | None:
    if not batch.status.is_terminal or batch.archived_at is not None:
        return None
    if (batch.metadata or {}).get("source") == SOURCE_FILE:
        return {"responsesFile": f"files/{gemini.responses_file_id(batch.id)}"}
    responses = [
        gemini.inlined_response(result, batch.model, batch.endpoint)
        async for result in deps.store.iter_results(batch.id)
    ]
    # Named for what they hold: the SDK tells embeddings from generated content by this name, or else by the first
    # answer that holds an embedding (none does when every request failed).
    kind = "inlinedEmbedContentResponses" if batch.endpoint == gemini.EMBEDDINGS_ENDPOINT else "inlinedResponses"
    return {kind: {"inlinedResponses": responses}}


async def _shown(deps: MessageBatchDeps, batch: Batch, unrun: UnrunCounts, *, with_output: bool) -> Shown:
    return Shown(batch, unrun, await _output(deps, batch) if with_output else None)


async def _find(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> Batch:
    batch = await deps.store.get_batch(tenant_id, batch_id, BatchApi.GEMINI) if "\x00" not in batch_id else None
    if batch is None:
        raise _not_found(batch_id)
    return batch


async def get_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> Shown:
    batch = await _find(deps, tenant_id, batch_id)
    unrun = (await deps.store.unrun_counts([batch.id])).get(batch.id, UnrunCounts())
    return await _shown(deps, batch, unrun, with_output=True)


async def list_batches(
    deps: MessageBatchDeps, tenant_id: str, *, page_size: int, page_token: str | None
) -> tuple[list[Shown], str | None]:
    """Newest first; the next page's token is the last batch's id. Listed batches carry their output only when
    it is a file (inline responses can be large: `get` has them)."""
    if not 1 <= page_size <= 1000:
        raise InvalidRequest(f"pageSize: must be between 1 and 1000, not {page_size}.")
    cursor = page_token or None
    page = None
    if cursor is None or "\x00" not in cursor:
        page = await deps.store.list_message_batches(
            tenant_id, limit=page_size, before_id=None, after_id=cursor, api=BatchApi.GEMINI
        )
    if page is None:
        raise InvalidRequest(f"pageToken: {cursor!r} is not a page token this server gave.")
    batches, more = page
    unrun = await deps.store.unrun_counts([batch.id for batch in batches])
    shown = []
    for batch in batches:
        from_file = (batch.metadata or {}).get("source") == SOURCE_FILE
        shown.append(await _shown(deps, batch, unrun.get(batch.id, UnrunCounts()), with_output=from_file))
    return shown, (batches[-1].id if more and batches else None)


async def cancel_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> None:
    """Remaining requests end cancelled (in-flight ones after a grace period); cancelling an ended batch is a
    no-op, as in Google's API."""
    await _find(deps, tenant_id, batch_id)
    try:
        await deps.store.request_cancel(tenant_id, batch_id, deps.now(), BatchApi.GEMINI)
    except NotFound:
        raise _not_found(batch_id) from None
    except Conflict:
        return


async def delete_batch(deps: MessageBatchDeps, tenant_id: str, batch_id: str) -> None:
    """Remove an ended batch with its results and its input lines (a running one: cancel it first)."""
    await _find(deps, tenant_id, batch_id)
    try:
        batch = await deps.store.delete_message_batch(tenant_id, batch_id, BatchApi.GEMINI)
    except NotFound:
        raise _not_found(batch_id) from None
    except Conflict:
        raise Conflict(
            f"Batch batches/{batch_id} is still running: cancel it, and delete it once it has ended."
        ) from None
    try:
        record = await deps.store.delete_file(tenant_id, batch.input_file_id)
    except NotFound:
        return  # already swept at the end of retention
    await deps.blobs.delete(record.blob_key)


async def responses_batch(deps: MessageBatchDeps, tenant_id: str, file_id: str) -> Batch:
    """The ended, file-sourced batch whose responses file `file_id` names."""
    batch_id = file_id.removesuffix(gemini.RESPONSES_SUFFIX)
    batch = await deps.store.get_batch(tenant_id, batch_id, BatchApi.GEMINI)
    if batch is None or (batch.metadata or {}).get("source") != SOURCE_FILE or not batch.status.is_terminal:
        raise NotFound(f"File files/{file_id} not found.")
    if batch.archived_at is not None:
        raise NotFound(f"File files/{file_id} is no longer kept (its batch's results were archived).")
    return batch


async def stream_responses(deps: MessageBatchDeps, batch: Batch) -> AsyncIterator[bytes]:
    """The responses file: one `{key, response | error}` line per request, in input order."""
    chunk = bytearray()
    async for result in deps.store.iter_results(batch.id):
        chunk += gemini.responses_line(result, batch.model, batch.endpoint)
        if len(chunk) >= 1 << 16:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)


# --- files: resumable uploads -----------------------------------------------------------------------------


@dataclass
class _Upload:
    tenant_id: str
    file_id: str
    writer: BlobWriter
    size: int | None  # declared by the start call
    display_name: str | None
    started_at: float


@dataclass
class UploadSessions:
    """Resumable uploads in progress in this process, by session id."""

    sessions: dict[str, _Upload] = field(default_factory=dict)

    async def start(
        self, deps: FileDeps, tenant_id: str, size: int | None, display_name: str | None, now: float
    ) -> str:
        if size is not None and size > deps.settings.max_file_bytes:
            raise PayloadTooLarge(f"The file is larger than {deps.settings.max_file_bytes} bytes.")
        for session_id, upload in list(self.sessions.items()):  # abandoned ones
            if now - upload.started_at > UPLOAD_SESSION_TTL_S:
                del self.sessions[session_id]
                await upload.writer.abort()
        file_id = ids.file_id()
        session_id = secrets.token_urlsafe(24)
        writer = deps.blobs.open_writer(f"files/{file_id}")
        self.sessions[session_id] = _Upload(tenant_id, file_id, writer, size, display_name, now)
        return session_id

    async def append(
        self, deps: FileDeps, session_id: str, offset: int, chunks: AsyncIterator[bytes], finalize: bool
    ) -> FileRecord | None:
        """Append a chunk at `offset`; with `finalize`, register the file and end the session (its record)."""
        upload = self.sessions.get(session_id)
        if upload is None:
            raise NotFound("No such upload session (it ended, or was opened by another process).")
        if offset != upload.writer.size:
            raise InvalidRequest(f"X-Goog-Upload-Offset is {offset}; the upload has {upload.writer.size} bytes.")
        limit = deps.settings.max_file_bytes
        try:
            async for chunk in chunks:
                if upload.writer.size + len(chunk) > limit:
                    raise PayloadTooLarge(f"The file is larger than {limit} bytes.")
                upload.writer.write(chunk)
        except BaseException:
            del self.sessions[session_id]
            await upload.writer.abort()
            raise
        if not finalize:
            return None
        del self.sessions[session_id]
        now = deps.now()
        record = FileRecord(
            id=upload.file_id,
            tenant_id=upload.tenant_id,
            filename=upload.display_name or "upload",
            purpose=GEMINI_PURPOSE,
            bytes=upload.writer.size,
            blob_key=f"files/{upload.file_id}",
            created_at=now,
            expires_at=now + deps.settings.batch_file_ttl_s,
        )
        await upload.writer.commit()
        try:
            await deps.store.add_file(record)
        except BaseException:
            await deps.blobs.delete(record.blob_key)
            raise
        return record


async def get_file(deps: FileDeps, tenant_id: str, file_id: str) -> FileRecord:
    record = await deps.store.get_file(tenant_id, file_id) if "\x00" not in file_id else None
    if record is None:
        raise NotFound(f"File files/{file_id} not found.")
    return record


async def list_files(
    deps: FileDeps, tenant_id: str, *, page_size: int, page_token: str | None
) -> tuple[list[FileRecord], str | None]:
    """The tenant's uploads through the Gemini Files API, newest first; the next page's token is the last id."""
    if not 1 <= page_size <= 100:
        raise InvalidRequest(f"pageSize: must be between 1 and 100, not {page_size}.")
    cursor = page_token or None
    page = None
    if cursor is None or "\x00" not in cursor:
        page = await deps.store.list_files(
            tenant_id, purpose=GEMINI_PURPOSE, limit=page_size, descending=True, after=cursor
        )
    if page is None:
        raise InvalidRequest(f"pageToken: {cursor!r} is not a page token this server gave.")
    records, more = page
    return records, (records[-1].id if more and records else None)
