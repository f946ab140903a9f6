"""Gemini's Batch and Files APIs under /gemini (docs/gemini.md): the google-genai SDK with
`http_options={"base_url": "http://HOST:PORT/gemini"}`, api_version v1 or v1beta. Errors are in Google's
envelope (http.errors). Not in the OpenAPI document: Google's API is described by its own discovery document.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from backfill.domain import gemini
from backfill.domain.files import FileRecord
from backfill.domain.message_batches import CHAT_ENDPOINT
from backfill.errors import InvalidRequest, NotFound
from backfill.http.auth import Authenticator, presented_key
from backfill.http.deps import ServicesDep, body_chunks, json_body, json_response
from backfill.http.server_url import server_url
from backfill.usecases import gemini as uc

PREFIX = "/gemini"
router = APIRouter(prefix=PREFIX, include_in_schema=False)
# Inline requests ride in the create call's body, parsed in memory: Google's own limit (20 MB); more goes in a file.
_MAX_INLINE_BYTES = 20 * 1024 * 1024
_METHODS = {"batchGenerateContent": CHAT_ENDPOINT, "asyncBatchEmbedContent": gemini.EMBEDDINGS_ENDPOINT}


async def tenant_of(
    request: Request,
    x_goog_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
    key: Annotated[str | None, Query()] = None,
) -> str:
    """The key from `x-goog-api-key` (the SDK's), `Authorization: Bearer`, or `?key=` (Google's REST docs)."""
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.tenant_for(presented_key(authorization, x_goog_api_key or key))


Tenant = Annotated[str, Depends(tenant_of)]


def _version(version: str) -> None:
    if version not in gemini.VERSIONS:
        raise NotFound(f"Unknown API version {version!r}: this server speaks {', '.join(sorted(gemini.VERSIONS))}.")


def _api_url(request: Request, services: ServicesDep, version: str) -> str:
    return f"{server_url(request, services.settings.public_url)}{PREFIX}/{version}"


# --- batches ----------------------------------------------------------------------------------------------


@router.post("/{version}/models/{name:path}")
async def gemini_model_method(
    version: str, name: str, request: Request, services: ServicesDep, tenant: Tenant
) -> Response:
    """`models/{model}:batchGenerateContent` and `:asyncBatchEmbedContent` (the model's name may hold `/`)."""
    _version(version)
    model, _, method = name.rpartition(":")
    endpoint = _METHODS.get(method)
    if endpoint is None:
        raise NotFound(
            f"Method models/{name} is not served here: models/{{model}}:batchGenerateContent or "
            ":asyncBatchEmbedContent."
        )
    payload = await json_body(request, min(services.settings.message_batch_max_bytes, _MAX_INLINE_BYTES))
    shown = await uc.create_batch(services, tenant, model, payload, endpoint)
    services.work_changed()
    return json_response(shown.operation())


@router.get("/{version}/batches")
async def list_gemini_batches(
    version: str,
    services: ServicesDep,
    tenant: Tenant,
    page_size: Annotated[int, Query(alias="pageSize")] = 50,
    page_token: Annotated[str | None, Query(alias="pageToken")] = None,
) -> Response:
    _version(version)
    shown, next_token = await uc.list_batches(services, tenant, page_size=page_size, page_token=page_token)
    answer: dict[str, object] = {"operations": [item.operation() for item in shown]}
    if next_token is not None:
        answer["nextPageToken"] = next_token
    return json_response(answer)


@router.get("/{version}/batches/{batch_id}")
async def get_gemini_batch(version: str, batch_id: str, services: ServicesDep, tenant: Tenant) -> Response:
    _version(version)
    return json_response((await uc.get_batch(services, tenant, batch_id)).operation())


@router.post("/{version}/batches/{name}")
async def gemini_batch_method(version: str, name: str, services: ServicesDep, tenant: Tenant) -> Response:
    """`batches/{id}:cancel`."""
    _version(version)
    batch_id, _, method = name.rpartition(":")
    if method != "cancel":
        raise NotFound(f"Method batches/{name} is not served here: only batches/{{id}}:cancel.")
    await uc.cancel_batch(services, tenant, batch_id)
    services.work_changed()
    return json_response({})


@router.delete("/{version}/batches/{batch_id}")
async def delete_gemini_batch(version: str, batch_id: str, services: ServicesDep, tenant: Tenant) -> Response:
    _version(version)
    await uc.delete_batch(services, tenant, batch_id)
    return json_response({})


# --- files ------------------------------------------------------------------------------------------------


def _sessions(request: Request) -> uc.UploadSessions:
    sessions: uc.UploadSessions | None = getattr(request.app.state, "gemini_uploads", None)
    if sessions is None:
        sessions = request.app.state.gemini_uploads = uc.UploadSessions()
    return sessions


def _declared_size(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidRequest("X-Goog-Upload-Header-Content-Length: must be a number of bytes.")
    return int(value)


@router.post("/upload/{version}/files")
async def upload_gemini_file(
    version: str,
    request: Request,
    services: ServicesDep,
    tenant: Tenant,
    upload_id: str | None = None,
    x_goog_upload_command: Annotated[str | None, Header()] = None,
    x_goog_upload_offset: Annotated[str | None, Header()] = None,
    x_goog_upload_header_content_length: Annotated[str | None, Header()] = None,
) -> Response:
    """Google's resumable upload: `start` answers the session's URL; chunks follow (`upload`, then `upload,
    finalize`), each at its offset; the last answers `{"file": File}`."""
    _version(version)
    sessions = _sessions(request)
    commands = {part.strip() for part in (x_goog_upload_command or "").split(",") if part.strip()}
    if upload_id is None:
        if commands != {"start"}:
            raise InvalidRequest("Start an upload with X-Goog-Upload-Protocol: resumable and Command: start.")
        payload = await json_body(request)
        file = payload.get("file") if isinstance(payload, dict) else None
        display = file.get("displayName") if isinstance(file, dict) else None
        size = _declared_size(x_goog_upload_header_content_length)
        session_id = await sessions.start(
            services, tenant, size, display if isinstance(display, str) else None, time.time()
        )
        url = (
            f"{server_url(request, services.settings.public_url)}{PREFIX}/upload/{version}/files?upload_id={session_id}"
        )
        return Response(status_code=200, headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"})
    if not commands or not commands <= {"upload", "finalize"}:
        raise InvalidRequest("X-Goog-Upload-Command: 'upload', 'upload, finalize' or 'finalize'.")
    offset = x_goog_upload_offset or "0"
    if not offset.isdigit():
        raise InvalidRequest("X-Goog-Upload-Offset: must be a number of bytes.")
    chunks = body_chunks(request, services.settings.max_file_bytes)
    record = await sessions.append(services, upload_id, int(offset), chunks, "finalize" in commands)
    if record is None:
        return Response(status_code=200, headers={"x-goog-upload-status": "active"})
    answer = json_response({"file": _file_object(request, services, version, record)})
    answer.headers["x-goog-upload-status"] = "final"
    return answer


def _file_object(request: Request, services: ServicesDep, version: str, record: FileRecord) -> dict[str, object]:
    return gemini.file_object(
        record.id,
        display_name=record.filename if record.filename != "upload" else None,
        mime_type="application/jsonl",
        size=record.bytes,
        created_at=record.created_at,
        expires_at=record.expires_at,
        server_url=_api_url(request, services, version),
    )


@router.get("/{version}/files")
async def list_gemini_files(
    version: str,
    request: Request,
    services: ServicesDep,
    tenant: Tenant,
    page_size: Annotated[int, Query(alias="pageSize")] = 10,
    page_token: Annotated[str | None, Query(alias="pageToken")] = None,
) -> Response:
    _version(version)
    records, next_token = await uc.list_files(services, tenant, page_size=page_size, page_token=page_token)
    answer: dict[str, object] = {"files": [_file_object(request, services, version, record) for record in records]}
    if next_token is not None:
        answer["nextPageToken"] = next_token
    return json_response(answer)


@router.get("/{version}/files/{name}")
async def get_gemini_file(version: str, name: str, request: Request, services: ServicesDep, tenant: Tenant) -> Response:
    """`files/{id}`, or its bytes with `files/{id}:download?alt=media` (a batch's responses file, or an upload)."""
    _version(version)
    file_id, _, method = name.partition(":")
    if method not in ("", "download"):
        raise NotFound(f"Method files/{name} is not served here: only files/{{id}}:download.")
    if file_id.endswith(gemini.RESPONSES_SUFFIX):
        batch = await uc.responses_batch(services, tenant, file_id)
        if method == "download":
            return StreamingResponse(uc.stream_responses(services, batch), media_type="application/jsonl")
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at or batch.created_at
        answer = gemini.file_object(
            file_id,
            display_name=f"responses of batches/{batch.id}",
            mime_type="application/jsonl",
            size=None,
            created_at=ended,
            expires_at=batch.created_at + services.settings.message_batch_retention_s,
            server_url=_api_url(request, services, version),
            generated=True,
        )
        return json_response(answer)
    record = await uc.get_file(services, tenant, file_id)
    if method == "download":
        return StreamingResponse(services.blobs.stream(record.blob_key), media_type="application/jsonl")
    return json_response(_file_object(request, services, version, record))


@router.delete("/{version}/files/{file_id}")
async def delete_gemini_file(version: str, file_id: str, services: ServicesDep, tenant: Tenant) -> Response:
    _version(version)
    await uc.get_file(services, tenant, file_id)
    record = await services.store.delete_file(tenant, file_id)
    await services.blobs.delete(record.blob_key)
    return json_response({})
