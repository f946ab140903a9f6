"""Request-scoped dependencies shared by the routes."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO, cast

import orjson
from fastapi import Depends, Header, Request
from fastapi.responses import Response

from backfill.errors import InvalidRequest, PayloadTooLarge, PermissionDenied
from backfill.http.auth import Authenticator, Caller, presented_key
from backfill.services import Services
from backfill.usecases import idempotency

MAX_JSON_BODY_BYTES = 1024 * 1024
STALE_SPOOL_S = 86400


# Dependencies are `async def` even where they do not await: FastAPI runs a plain `def` one in a worker thread,
# a hand-off to another thread and back on every request (milliseconds of an interactive request's TTFT on a busy
# machine).
async def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def tenant_of(
    request: Request,
    # In the document as security schemes (http.openapi), not as parameters.
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.tenant_for(presented_key(authorization, x_api_key))


async def admin_of(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Caller:
    """The caller, if it may use the admin API: an admin key, or anyone in open mode (loopback only)."""
    authenticator: Authenticator = request.app.state.authenticator
    caller = await authenticator.caller_for(presented_key(authorization, x_api_key))
    if not caller.admin:
        raise PermissionDenied(
            "This operation needs an admin API key (`backfill keys create --admin`).", code="admin_key_required"
        )
    return caller


async def caller_of(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Caller:
    """Whoever the key belongs to: an admin (or anyone in open mode), or a tenant."""
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.caller_for(presented_key(authorization, x_api_key))


async def idempotency_key_of(
    idempotency_key: Annotated[
        str | None,
        Header(description="Repeat a create safely: a repeat within 24 h gets the first answer (docs/clients.md)."),
    ] = None,
) -> str | None:
    return idempotency.parse_key(idempotency_key)


ServicesDep = Annotated[Services, Depends(services_of)]
TenantDep = Annotated[str, Depends(tenant_of)]
AdminDep = Annotated[Caller, Depends(admin_of)]
CallerDep = Annotated[Caller, Depends(caller_of)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key_of)]


async def body_chunks(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body as it arrives, refused (413) as soon as it is known to pass `max_bytes`: no more of it is read.
    A declared Content-Length over the limit is refused before the first byte."""
    too_large = PayloadTooLarge(f"The request body is larger than {max_bytes} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        yield chunk


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, in memory: for bodies whose limit is small."""
    data = bytearray()
    async for chunk in body_chunks(request, max_bytes):
        data += chunk
    return bytes(data)


def _open_spool(directory: Path) -> BinaryIO:
    """A named file (a worker process may read it by name), removed when closed; should the process die first,
    the next spool opened in the directory removes it (and any other file there) once it is a day old."""
    directory.mkdir(parents=True, exist_ok=True)
    stale = time.time() - STALE_SPOOL_S
    for path in directory.iterdir():
        with contextlib.suppress(OSError):  # another process's, removed meanwhile
            if path.stat().st_mtime < stale:
                path.unlink()
    return cast(BinaryIO, tempfile.NamedTemporaryFile(dir=directory, prefix="body-"))


@asynccontextmanager
async def spooled_body(request: Request, max_bytes: int, directory: Path) -> AsyncIterator[BinaryIO]:
    """The whole body in a temporary file under `directory` (gone once closed, or should the process die), for
    bodies too large to hold in memory."""
    spool = await asyncio.to_thread(_open_spool, directory)
    try:
        async for chunk in body_chunks(request, max_bytes):
            spool.write(chunk)  # into the page cache: too quick to be worth a thread
        spool.flush()
        yield spool
    finally:
        await asyncio.to_thread(spool.close)  # freeing a 256 MB file's blocks took 0.2 s in the event loop


async def json_body(request: Request, max_bytes: int = MAX_JSON_BODY_BYTES) -> Any:
    """Read and parse a JSON body ourselves: bounded size, and orjson rejects absurd nesting cleanly."""
    data = await read_body(request, max_bytes)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")


def idempotent_response(answer: idempotency.Answer) -> Response:
    headers = {"idempotent-replayed": "true"} if answer.replayed else {}
    return Response(answer.body, status_code=answer.status, media_type="application/json", headers=headers)
