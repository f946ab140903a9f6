"""Batches API (SPEC §3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from backfill.http.deps import (
    IdempotencyKeyDep,
    ServicesDep,
    TenantDep,
    idempotent_response,
    json_body,
    json_response,
)
from backfill.http.openapi import link, ok, openai_errors, request_body
from backfill.http.schemas import BatchList, BatchObject, RetryBatch
from backfill.usecases import batches as uc
from backfill.usecases import idempotency, retries

router = APIRouter(prefix="/v1/batches", tags=["batches"])

_BATCH_LINKS = {
    "RetrieveBatch": link("retrieve_batch", batch_id="$response.body#/id"),
    "CancelBatch": link("cancel_batch", batch_id="$response.body#/id"),
    "RetryBatch": link("retry_batch", batch_id="$response.body#/id"),
}


@router.post(
    "",
    openapi_extra=request_body(uc.CreateBatch),
    responses=ok(
        BatchObject,
        "The batch, `validating`: problems with the file's content fail it later, with `errors`.",
        _BATCH_LINKS,
    )
    | openai_errors(400, 409, 413),
)
async def create_batch(
    request: Request, services: ServicesDep, tenant: TenantDep, key: IdempotencyKeyDep = None
) -> Response:
    payload = await json_body(request)
    asked = idempotency.fingerprint("POST /v1/batches", payload)

    async def create() -> tuple[str, dict[str, Any]]:
        batch = await uc.create_batch(services, tenant, uc.parse_create(payload))
        services.work_changed()
        # just created: no line has ended
        return asked, batch.to_openai(output_id_at_start=services.settings.output_file_id_at_start)

    if key is None:
        return json_response((await create())[1])

    async def repeat() -> str:
        return asked

    return idempotent_response(await idempotency.serve_once(services, tenant, key, create, repeat))


@router.get("", responses=ok(BatchList, "This key's batches, newest first.") | openai_errors(400))
async def list_batches(
    services: ServicesDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> Response:
    batches, has_more = await uc.list_batches(services, tenant, limit=limit, after=after)
    return json_response(
        {
            "object": "list",
            "data": await uc.batch_objects(services, batches),
            "first_id": batches[0].id if batches else None,
            "last_id": batches[-1].id if batches else None,
            "has_more": has_more,
        }
    )


@router.get("/{batch_id}", responses=ok(BatchObject, "The batch.") | openai_errors(404))
async def retrieve_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    return json_response(await uc.batch_object(services, await uc.get_batch(services, tenant, batch_id)))


@router.post(
    "/{batch_id}/retry",
    openapi_extra=request_body(RetryBatch, required=False),
    responses=ok(BatchObject, "The new batch of the lines that did not succeed.", _BATCH_LINKS)
    | openai_errors(400, 404, 409, 413),
)
async def retry_batch(batch_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """backfill's extension (README, "Command line"): a new batch of exactly this finished batch's failed, expired or
    cancelled lines (body `{"only": [...]}`, optional), linked to it in `metadata.backfill_retry_of`."""
    payload = await json_body(request) if request.headers.get("content-length", "0") != "0" else None
    batch = await retries.retry_batch(services, tenant, batch_id, retries.parse_retry(payload))
    services.work_changed()
    # just created: no line has ended
    return json_response(batch.to_openai(output_id_at_start=services.settings.output_file_id_at_start))


@router.post(
    "/{batch_id}/cancel",
    responses=ok(BatchObject, "The batch, normally `cancelling`.") | openai_errors(404, 409),
)
async def cancel_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    batch = await uc.cancel_batch(services, tenant, batch_id)
    services.work_changed()
    return json_response(await uc.batch_object(services, batch))
