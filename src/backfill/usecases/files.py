"""Files API use cases (SPEC §2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from backfill import ids
from backfill.domain.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S, PURPOSES, FileRecord
from backfill.errors import InvalidRequest, NotFound
from backfill.http.upload import receive_upload
from backfill.services import Services


def _expires_after_s(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after[anchor]")
    try:
        value = int(seconds or "")
    except ValueError:
        raise InvalidRequest("expires_after[seconds] must be an integer.", param="expires_after[seconds]") from None
    if not MIN_EXPIRES_AFTER_S <= value <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(
            f"expires_after[seconds] must be between {MIN_EXPIRES_AFTER_S} and {MAX_EXPIRES_AFTER_S}.",
            param="expires_after[seconds]",
        )
    return value


async def upload_file(
    services: Services, tenant_id: str, chunks: AsyncIterator[bytes], content_type: str | None
) -> FileRecord:
    """Stream the upload into the blob store; register it only when everything about it is valid."""
    file_id = ids.file_id()
    key = f"files/{file_id}"
    writer = services.blobs.open_writer(key)
    try:
        form = await receive_upload(chunks, content_type, writer, services.settings.max_file_bytes)
        purpose = form.fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"Invalid purpose {purpose!r}: must be one of {', '.join(sorted(PURPOSES))}.", param="purpose"
            )
        assert form.filename is not None
        if purpose == "batch" and not form.filename.endswith(".jsonl"):
            raise InvalidRequest("Invalid file format for Batch API. Must be .jsonl", param="file")
        expires_after = _expires_after_s(form.fields)
    except BaseException:
        await writer.abort()
        raise
    now = services.now()
    if expires_after is None and purpose == "batch":
        expires_after = services.settings.batch_file_ttl_s
    record = FileRecord(
        id=file_id,
        tenant_id=tenant_id,
        filename=form.filename,
        purpose=purpose,
        bytes=form.size,
        blob_key=key,
        created_at=now,
        expires_at=now + expires_after if expires_after is not None else None,
    )
    await writer.commit()
    try:
        await services.store.add_file(record)
    except BaseException:
        await services.blobs.delete(key)
        raise
    return record


async def get_file(services: Services, tenant_id: str, file_id: str) -> FileRecord:
    record = await services.store.get_file(tenant_id, file_id)
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return record


async def delete_file(services: Services, tenant_id: str, file_id: str) -> FileRecord:
    record = await services.store.delete_file(tenant_id, file_id)
    await services.blobs.delete(record.blob_key)
    return record


async def list_files(
    services: Services, tenant_id: str, *, purpose: str | None, limit: int, order: str, after: str | None
) -> tuple[list[FileRecord], bool]:
    page = await services.store.list_files(
        tenant_id, purpose=purpose, limit=limit, descending=order == "desc", after=after
    )
    if page is None:
        raise InvalidRequest(f"Invalid 'after': no file {after!r}.", param="after")
    return page
