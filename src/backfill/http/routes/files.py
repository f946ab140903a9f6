"""Files API (SPEC §2)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from backfill.http.deps import IdempotencyKeyDep, ServicesDep, TenantDep, idempotent_response, json_response
from backfill.http.openapi import link, ok, openai_errors, raw_ok, request_body
from backfill.http.schemas import FileDeleted, FileList, FileObject, FileUpload
from backfill.http.upload import check_declared_length
from backfill.usecases import files as uc
from backfill.usecases import idempotency

router = APIRouter(prefix="/v1/files", tags=["files"])

_FILE_LINKS = {
    "RetrieveFile": link("retrieve_file", file_id="$response.body#/id"),
    "FileContent": link("file_content", file_id="$response.body#/id"),
    "DeleteFile": link("delete_file", file_id="$response.body#/id"),
    "CreateBatch": {
        "operationId": "create_batch",
        "requestBody": {
            "input_file_id": "$response.body#/id",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    },
}


@router.post(
    "",
    openapi_extra=request_body(FileUpload, "multipart/form-data"),
    responses=ok(FileObject, "The stored file.", _FILE_LINKS) | openai_errors(400, 409, 413, 503),
)
async def upload_file(
    request: Request, services: ServicesDep, tenant: TenantDep, key: IdempotencyKeyDep = None
) -> Response:
    content_type = request.headers.get("content-type")
    check_declared_length(request.headers.get("content-length"), services.settings.max_file_bytes)

    async def upload() -> tuple[str, dict[str, Any]]:
        record, fingerprint = await uc.upload_file(services, tenant, request.stream(), content_type)
        return fingerprint, record.to_openai()

    if key is None:
        return json_response((await upload())[1])
    answer = await idempotency.serve_once(
        services,
        tenant,
        key,
        upload,
        lambda: uc.read_upload_fingerprint(services, request.stream(), content_type),
    )
    return idempotent_response(answer)


@router.get("", responses=ok(FileList, "This key's files, newest first by default.") | openai_errors(400))
async def list_files(
    services: ServicesDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Response:
    records, has_more = await uc.list_files(services, tenant, purpose=purpose, limit=limit, order=order, after=after)
    data = [record.to_openai() for record in records]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


@router.get("/{file_id}", responses=ok(FileObject, "The file.") | openai_errors(404))
async def retrieve_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    return json_response((await uc.get_file(services, tenant, file_id)).to_openai())


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses=raw_ok("application/octet-stream", "The file's bytes.", {"type": "string", "format": "binary"})
    | openai_errors(400, 404, 503),
)
async def file_content(
    file_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    offset: Annotated[
        int | None,
        Query(ge=0, description="Skip this many lines (an extension: resume a partial read at `X-Last-Line`)."),
    ] = None,
) -> Response:
    content = await uc.file_content(services, tenant, file_id, offset)
    return StreamingResponse(content.chunks, media_type="application/octet-stream", headers=content.headers)


@router.delete("/{file_id}", responses=ok(FileDeleted, "The file is gone.") | openai_errors(404, 409, 503))
async def delete_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    record = await uc.delete_file(services, tenant, file_id)
    return json_response({"id": record.id, "object": "file", "deleted": True})
