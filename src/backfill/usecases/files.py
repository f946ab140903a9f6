"""Files API use cases (SPEC §2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from backfill import ids
from backfill.domain.batches import BatchApi, batch_id_of_output
from backfill.domain.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S, PURPOSES, FileRecord, is_jsonl
from backfill.domain.results import output_line
from backfill.errors import InvalidRequest, NotFound
from backfill.http.upload import DiscardingWriter, UploadedForm, receive_upload
from backfill.usecases import idempotency, params
from backfill.usecases.deps import FileDeps

INVALID_BATCH_FILE = "Invalid file format for Batch API. Must be .jsonl"


def _expires_after_s(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor is None:
        raise params.missing("expires_after[anchor]")
    if anchor != "created_at":
        raise params.supported_values("expires_after[anchor]", anchor, ["created_at"])
    if seconds is None:
        raise params.missing("expires_after[seconds]")
    try:
        value = int(seconds)
    except ValueError:
        raise params.invalid_type("expires_after[seconds]", "an integer", seconds) from None
    if value < MIN_EXPIRES_AFTER_S:
        raise InvalidRequest(
            f"Invalid 'expires_after[seconds]': integer below minimum value. Expected a value >= "
            f"{MIN_EXPIRES_AFTER_S}, but got {value} instead.",
            param="expires_after[seconds]",
            code="integer_below_min_value",
        )
    if value > MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(
            f"Invalid 'expires_after[seconds]': integer above maximum value. Expected a value <= "
            f"{MAX_EXPIRES_AFTER_S}, but got {value} instead.",
            param="expires_after[seconds]",
            code="integer_above_max_value",
        )
    return value


async def upload_file(
    deps: FileDeps, tenant_id: str, chunks: AsyncIterator[bytes], content_type: str | None
) -> tuple[FileRecord, str]:
    """Stream the upload into the blob store; register it only when everything about it is valid. The record and
    the upload's fingerprint."""
    file_id = ids.file_id()
    key = f"files/{file_id}"
    writer = deps.blobs.open_writer(key)
    try:
        form = await receive_upload(chunks, content_type, writer, deps.settings.max_file_bytes)
        purpose = form.fields.get("purpose")
        if purpose is None:
            raise params.missing("purpose")
        if purpose not in PURPOSES:
            raise params.supported_values("purpose", purpose, PURPOSES)
        # Judged by what the file holds, not by its name: SDKs name raw bytes `upload`, and a `.jsonl` may be empty.
        if purpose == "batch" and not is_jsonl(form.head, form.size):
            raise InvalidRequest(INVALID_BATCH_FILE, param="file", code="invalid_file_format")
        expires_after = _expires_after_s(form.fields)
    except BaseException:
        await writer.abort()
        raise
    now = deps.now()
    if expires_after is None and purpose == "batch":
        expires_after = deps.settings.batch_file_ttl_s
    record = FileRecord(
        id=file_id,
        tenant_id=tenant_id,
        filename=form.filename or "upload",
        purpose=purpose,
        bytes=form.size,
        blob_key=key,
        created_at=now,
        expires_at=now + expires_after if expires_after is not None else None,
    )
    await writer.commit()
    try:
        await deps.store.add_file(record)
    except BaseException:
        await deps.blobs.delete(key)
        raise
    return record, upload_fingerprint(form)


def upload_fingerprint(form: UploadedForm) -> str:
    """What an upload asked for: its fields, file name and content (not the multipart framing)."""
    return idempotency.fingerprint("POST /v1/files", [sorted(form.fields.items()), form.filename, form.digest])


async def read_upload_fingerprint(deps: FileDeps, chunks: AsyncIterator[bytes], content_type: str | None) -> str:
    """The fingerprint of an upload that is read but not kept (a repeat of an idempotent create)."""
    form = await receive_upload(chunks, content_type, DiscardingWriter(), deps.settings.max_file_bytes)
    return upload_fingerprint(form)


async def get_file(deps: FileDeps, tenant_id: str, file_id: str) -> FileRecord:
    record = await deps.store.get_file(tenant_id, file_id)
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return record


@dataclass(frozen=True)
class Content:
    """A file's bytes as they will be sent, and the headers that go with them."""

    chunks: AsyncIterator[bytes]
    headers: dict[str, str]


async def file_content(deps: FileDeps, tenant_id: str, file_id: str, offset: int | None = None) -> Content:
    """A file's bytes; `offset` skips that many lines. A running OpenAI batch's output file can be read before it
    exists: the lines settled so far, in input order, with `X-Incomplete: true` and `X-Last-Line` (the offset to
    ask for next) — the convention autobatcher and Doubleword use (docs/partial-results.md)."""
    record = await deps.store.get_file(tenant_id, file_id) if "\x00" not in file_id else None
    if record is None:
        batch_id = batch_id_of_output(file_id)
        batch = await deps.store.get_batch(tenant_id, batch_id, BatchApi.OPENAI) if batch_id else None
        if batch is not None and not batch.status.is_terminal:
            settled = await deps.store.settled_successes(batch.id)
            skip = min(offset or 0, settled)
            headers = {"x-incomplete": "true", "x-last-line": str(settled)}
            return Content(_settled_lines(deps, batch.id, skip, settled - skip), headers)
        record = await get_file(deps, tenant_id, file_id)  # ended meanwhile, or never a running batch's output
    if offset is None:
        return Content(deps.blobs.stream(record.blob_key), {"content-length": str(record.bytes)})
    total = await _count_lines(deps, record.blob_key)
    headers = {"x-incomplete": "false", "x-last-line": str(total)}
    return Content(_lines_after(deps, record.blob_key, min(offset, total)), headers)


async def _settled_lines(deps: FileDeps, batch_id: str, skip: int, count: int) -> AsyncIterator[bytes]:
    """Output lines `skip`+1 to `skip`+`count` of a running batch: the successes, in input order."""
    chunk = bytearray()
    seen = sent = 0
    async for result in deps.store.iter_results(batch_id):
        if sent >= count:
            break
        if not result.is_success:
            continue
        seen += 1
        if seen <= skip:
            continue
        chunk += output_line(result, "")  # a settled line has its result id
        sent += 1
        if len(chunk) >= 1 << 16:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)


async def _count_lines(deps: FileDeps, key: str) -> int:
    return sum([chunk.count(b"\n") async for chunk in deps.blobs.stream(key)])


async def _lines_after(deps: FileDeps, key: str, skip: int) -> AsyncIterator[bytes]:
    async for chunk in deps.blobs.stream(key):
        while skip and chunk:
            end = chunk.find(b"\n")
            if end < 0:
                chunk = b""
                break
            chunk = chunk[end + 1 :]
            skip -= 1
        if chunk:
            yield chunk


async def delete_file(deps: FileDeps, tenant_id: str, file_id: str) -> FileRecord:
    record = await deps.store.delete_file(tenant_id, file_id)
    await deps.blobs.delete(record.blob_key)
    return record


async def list_files(
    deps: FileDeps, tenant_id: str, *, purpose: str | None, limit: int, order: str, after: str | None
) -> tuple[list[FileRecord], bool]:
    page = await deps.store.list_files(tenant_id, purpose=purpose, limit=limit, descending=order == "desc", after=after)
    if page is None:
        raise InvalidRequest(f"Invalid 'after': no file {after!r}.", param="after")
    return page
