"""Batches API use cases (SPEC §3)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backfill import ids
from backfill.domain.batches import ENDPOINTS, Batch, BatchApi, BatchStatus
from backfill.domain.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from backfill.errors import InvalidRequest, NotFound
from backfill.services import Services

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class OutputExpiresAfter(BaseModel):
    anchor: str
    seconds: int = Field(ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S)

    @field_validator("anchor")
    @classmethod
    def _created_at(cls, anchor: str) -> str:
        if anchor != "created_at":
            raise ValueError("anchor must be 'created_at'")
        return anchor


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: OutputExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters")
            if len(value) > MAX_METADATA_VALUE:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters")
        return metadata


def parse_create(payload: Any) -> CreateBatch:
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return CreateBatch.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"][:2]) or None
        raise InvalidRequest(f"Invalid '{param}': {first['msg']}.", param=param) from None


async def create_batch(services: Services, tenant_id: str, request: CreateBatch) -> Batch:
    """Check the request itself now; the file's content is validated by the dispatcher (status `validating`)."""
    if request.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid endpoint {request.endpoint!r}: must be one of {', '.join(sorted(ENDPOINTS))}.",
            param="endpoint",
        )
    window_s = services.settings.window_s(request.completion_window)
    if window_s is None:
        raise InvalidRequest(
            f"Invalid completion_window {request.completion_window!r}: must be one of "
            f"{', '.join(services.settings.completion_windows)}.",
            param="completion_window",
        )
    record = await services.store.get_file(tenant_id, request.input_file_id)
    if record is None:
        raise NotFound(f"No such File object: {request.input_file_id}", param="input_file_id")
    if record.purpose != "batch":
        raise InvalidRequest(
            f"The input file must have purpose 'batch', not {record.purpose!r}.", param="input_file_id"
        )
    now = services.now()
    batch = Batch(
        id=ids.batch_id(),
        tenant_id=tenant_id,
        endpoint=request.endpoint,
        input_file_id=request.input_file_id,
        completion_window=request.completion_window,
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + window_s,
        metadata=request.metadata,
        output_expires_after_s=request.output_expires_after.seconds if request.output_expires_after else None,
    )
    await services.store.create_batch(batch)
    return batch


async def get_batch(services: Services, tenant_id: str, batch_id: str) -> Batch:
    batch = await services.store.get_batch(tenant_id, batch_id, BatchApi.OPENAI)
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


async def cancel_batch(services: Services, tenant_id: str, batch_id: str) -> Batch:
    return await services.store.request_cancel(tenant_id, batch_id, services.now(), BatchApi.OPENAI)


async def list_batches(
    services: Services, tenant_id: str, *, limit: int, after: str | None
) -> tuple[list[Batch], bool]:
    page = await services.store.list_batches(tenant_id, limit=limit, after=after)
    if page is None:
        raise InvalidRequest(f"Invalid 'after': no batch {after!r}.", param="after")
    return page
