"""Batches API use cases (SPEC §3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from backfill import ids
from backfill.domain import result_cache
from backfill.domain.batches import ENDPOINTS, Batch, BatchApi, BatchStatus
from backfill.domain.bodies import json_kind
from backfill.domain.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from backfill.errors import InvalidRequest, NotFound
from backfill.usecases import params
from backfill.usecases.deps import BatchDeps

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


_ENDPOINT_VALUES: list[JsonValue] = [*sorted(ENDPOINTS)]


class OutputExpiresAfter(BaseModel):
    """When the batch's output and error files expire, counted from their creation."""

    model_config = ConfigDict(extra="ignore", strict=True)

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S)


class CreateBatch(BaseModel):
    """The body of `POST /v1/batches`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str = Field(description="A `purpose=batch` file of this tenant.")
    # Checked by create_batch (its 400 lists the supported values); the enum and examples are for the document.
    endpoint: str = Field(json_schema_extra={"enum": _ENDPOINT_VALUES})
    completion_window: str = Field(
        description="`24h`, or another window the server is configured with.", examples=["24h"]
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        description=f"At most {MAX_METADATA_PAIRS} pairs; keys up to {MAX_METADATA_KEY} characters, values up to "
        f"{MAX_METADATA_VALUE}.",
    )
    output_expires_after: OutputExpiresAfter | None = None


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': too many properties. Expected an object with at most {MAX_METADATA_PAIRS} "
            f"properties, but got an object with {len(metadata)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"Invalid 'metadata': key too long. Expected a key with maximum length {MAX_METADATA_KEY}, but got "
                f"a key with length {len(key)} instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                f"{MAX_METADATA_VALUE}, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )


def parse_create(payload: Any) -> CreateBatch:
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"Invalid type for the request body: expected an object, but got {json_kind(payload)} instead.",
            code="invalid_type",
        )
    try:
        request = CreateBatch.model_validate(payload)
    except ValidationError as exc:
        raise params.from_validation_error(dict(exc.errors()[0])) from None
    _check_metadata(request.metadata)
    if (why := result_cache.metadata_error(request.metadata)) is not None:
        raise InvalidRequest(why, param=f"metadata.{result_cache.METADATA_KEY}")
    return request


async def create_batch(deps: BatchDeps, tenant_id: str, request: CreateBatch) -> Batch:
    """Check the request itself now; the file's content is validated by the dispatcher (status `validating`).

    An input file that does not exist, or belongs to another tenant, is not refused here: the batch fails
    validation with "Cannot find file …", as OpenAI's does, the same in both cases so existence never leaks.
    """
    if request.endpoint not in ENDPOINTS:
        raise params.supported_values("endpoint", request.endpoint, ENDPOINTS)
    window_s = deps.settings.window_s(request.completion_window)
    if window_s is None:
        raise params.supported_values("completion_window", request.completion_window, deps.settings.completion_windows)
    if "\x00" in request.input_file_id:  # no id has one, and PostgreSQL text cannot store it
        raise InvalidRequest(
            "Invalid 'input_file_id': it must not contain NUL characters.", param="input_file_id", code="invalid_value"
        )
    record = await deps.store.get_file(tenant_id, request.input_file_id)
    if record is not None and record.purpose != "batch":
        raise InvalidRequest(
            f"The input file must have purpose 'batch', not {record.purpose!r}.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    now = deps.now()
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
    await deps.store.create_batch(batch)
    return batch


async def batch_objects(deps: BatchDeps, batches: Sequence[Batch]) -> list[dict[str, Any]]:
    """The batch objects of `batches`, with how many of each one's lines expired or were cancelled unrun."""
    unrun = await deps.store.unrun_counts([batch.id for batch in batches if _may_have_unrun(batch)])
    return [
        batch.to_openai(
            expired=unrun[batch.id].expired if batch.id in unrun else 0,
            cancelled=unrun[batch.id].canceled if batch.id in unrun else 0,
            output_id_at_start=deps.settings.output_file_id_at_start,
        )
        for batch in batches
    ]


async def batch_object(deps: BatchDeps, batch: Batch) -> dict[str, Any]:
    return (await batch_objects(deps, [batch]))[0]


def _may_have_unrun(batch: Batch) -> bool:
    """Lines that expired or were cancelled unrun count as failed: only a batch with failed lines has any."""
    return batch.failed > 0 and batch.status is not BatchStatus.FAILED


async def get_batch(deps: BatchDeps, tenant_id: str, batch_id: str) -> Batch:
    batch = await deps.store.get_batch(tenant_id, batch_id, BatchApi.OPENAI)
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


async def cancel_batch(deps: BatchDeps, tenant_id: str, batch_id: str) -> Batch:
    return await deps.store.request_cancel(tenant_id, batch_id, deps.now(), BatchApi.OPENAI)


async def list_batches(deps: BatchDeps, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    page = await deps.store.list_batches(tenant_id, limit=limit, after=after)
    if page is None:
        raise InvalidRequest(f"Invalid 'after': no batch {after!r}.", param="after")
    return page
