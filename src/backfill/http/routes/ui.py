"""The dashboard at /ui (docs/dashboard.md): its pages, its static files, and the cookie-authenticated JSON it
reads under /ui/api. Not in /openapi.json: a browser's API, not a client's."""

from __future__ import annotations

import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Cookie, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from backfill.domain.tenants import DEFAULT_TENANT
from backfill.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from backfill.http.auth import Authenticator, Caller
from backfill.http.deps import ServicesDep, json_body, json_response
from backfill.http.ui_history import EndpointHistory
from backfill.http.ui_session import COOKIE, OPEN_MODE, SESSION_S, SessionSigner
from backfill.services import Services
from backfill.store.dashboard import BatchFilter
from backfill.usecases import dashboard as uc
from backfill.usecases import files as files_uc
from backfill.usecases import retries

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)
_STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
_PAGES = ("", "/", "/login", "/endpoints", "/usage")
# No inline script, nothing from another origin: the pages load their own files only. Inline style attributes are
# allowed (progress bars' widths, chart colours).
_CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)


def _asset(name: str) -> bytes:
    return resources.files("backfill.http.ui").joinpath(name).read_bytes()


def _page() -> Response:
    headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=headers)


@router.get("")
@router.get("/")
@router.get("/login")
@router.get("/endpoints")
@router.get("/usage")
async def page() -> Response:
    return _page()


@router.get("/batches/{batch_id}")
async def batch_page(batch_id: str) -> Response:
    return _page()


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in _STATIC:
        raise NotFound(f"No such file: {name}")
    return Response(_asset(name), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


async def _caller(request: Request, services: Services, token: str | None) -> tuple[Caller, str]:
    """Who the session cookie signs in, and its CSRF token; the key must still be live."""
    signer: SessionSigner = request.app.state.ui_signer
    session = signer.read(token, int(time.time()))
    refused = AuthenticationFailed("Sign in at /ui/login.", code="not_signed_in")
    if session is None:
        raise refused
    if session.key_id == OPEN_MODE:
        if await services.store.count_api_keys() != 0:
            raise refused  # open mode ended: sign in with a key
        return Caller(await services.store.ensure_tenant(DEFAULT_TENANT, services.now()), admin=True), session.csrf
    key = await services.store.find_key(session.key_id)
    if key is None or key.revoked_at is not None:
        raise refused
    return Caller(key.tenant_id, key.admin, key.id), session.csrf


SessionCookie = Annotated[str | None, Cookie(alias=COOKIE)]
CsrfHeader = Annotated[str | None, Header(alias="x-csrf-token")]


async def _scope(request: Request, services: Services, token: str | None) -> str | None:
    caller, _ = await _caller(request, services, token)
    return None if caller.admin else caller.tenant_id


async def _acting_scope(request: Request, services: Services, token: str | None, csrf: str | None) -> str | None:
    """The scope of a state-changing request, which must carry the session's CSRF token in `X-CSRF-Token`."""
    caller, expected = await _caller(request, services, token)
    if csrf != expected:
        raise PermissionDenied("Missing or wrong X-CSRF-Token.", code="csrf_failed")
    return None if caller.admin else caller.tenant_id


@router.post("/api/login")
async def login(request: Request, services: ServicesDep) -> Response:
    # JSON only: a form on another site cannot send it without a CORS preflight, which this origin never answers.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InvalidRequest('Sign in with a JSON body: {"key": "..."}.', code="json_required")
    payload = await json_body(request)
    key = payload.get("key") if isinstance(payload, dict) else None
    authenticator: Authenticator = request.app.state.authenticator
    caller = await authenticator.caller_for(key.strip() if isinstance(key, str) and key.strip() else None)
    signer: SessionSigner = request.app.state.ui_signer
    token, session = signer.issue(caller.key_id or OPEN_MODE, int(time.time()))
    response = json_response(await _me(services, caller, session.csrf))
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def _me(services: Services, caller: Caller, csrf: str) -> dict[str, object]:
    names = await uc.queries(services).tenant_names()
    return {"tenant": names.get(caller.tenant_id, caller.tenant_id), "admin": caller.admin, "csrf": csrf}


@router.post("/api/logout")
async def logout() -> Response:
    response = json_response({"signed_out": True})
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@router.get("/api/session")
async def session(request: Request, services: ServicesDep, token: SessionCookie = None) -> Response:
    caller, csrf = await _caller(request, services, token)
    return json_response(await _me(services, caller, csrf))


@router.get("/api/batches")
async def list_batches(
    request: Request,
    services: ServicesDep,
    token: SessionCookie = None,
    status: str | None = None,
    tenant: str | None = None,
    model: str | None = None,
    metadata: str | None = None,
    limit: Annotated[int, Query(ge=1, le=uc.MAX_LIST)] = 1000,
) -> Response:
    scope = await _scope(request, services, token)
    tenant_id = None
    if tenant and scope is None:
        found = await services.store.get_tenant(tenant)
        if found is None:
            return json_response({"data": []})
        tenant_id = found.id
    where = BatchFilter(tenant_id, status or None, model or None, metadata or None)
    return json_response({"data": await uc.list_batches(services, scope, where, limit)})


@router.get("/api/batches/{batch_id}")
async def batch(batch_id: str, request: Request, services: ServicesDep, token: SessionCookie = None) -> Response:
    return json_response(await uc.batch_detail(services, await _scope(request, services, token), batch_id))


@router.post("/api/batches/{batch_id}/cancel")
async def cancel(
    batch_id: str, request: Request, services: ServicesDep, token: SessionCookie = None, csrf: CsrfHeader = None
) -> Response:
    scope = await _acting_scope(request, services, token, csrf)
    batch = await uc.get_batch(services, scope, batch_id)
    await services.store.request_cancel(batch.tenant_id, batch.id, services.now())
    services.work_changed()
    return json_response(await uc.batch_detail(services, scope, batch_id))


@router.post("/api/batches/{batch_id}/retry")
async def retry(
    batch_id: str, request: Request, services: ServicesDep, token: SessionCookie = None, csrf: CsrfHeader = None
) -> Response:
    scope = await _acting_scope(request, services, token, csrf)
    batch = await uc.get_batch(services, scope, batch_id)
    new = await retries.retry_batch(services, batch.tenant_id, batch.id, retries.parse_retry(None))
    services.work_changed()
    return json_response({"id": new.id})


@router.get("/api/batches/{batch_id}/files/{kind}")
async def download(
    batch_id: str, kind: str, request: Request, services: ServicesDep, token: SessionCookie = None
) -> Response:
    batch = await uc.get_batch(services, await _scope(request, services, token), batch_id)
    file_id = {"input": batch.input_file_id, "output": batch.output_file_id, "error": batch.error_file_id}.get(kind)
    if not file_id:
        raise NotFound(f"This batch has no {kind} file.")
    content = await files_uc.file_content(services, batch.tenant_id, file_id)
    headers = content.headers | {"Content-Disposition": f'attachment; filename="{batch.id}-{kind}.jsonl"'}
    return StreamingResponse(content.chunks, media_type="application/octet-stream", headers=headers)


@router.get("/api/endpoints")
async def endpoints(
    request: Request, services: ServicesDep, token: SessionCookie = None, window: str = "hour"
) -> Response:
    await _scope(request, services, token)
    history: EndpointHistory = request.app.state.ui_history
    if window == "day":
        samples = history.day.since(services.clock() - 86400)
    else:
        samples = history.hour.since(services.clock() - 3600)
    return json_response({"window": window, "step_s": history.step_s, "backends": samples})


@router.get("/api/usage")
async def usage(
    request: Request, services: ServicesDep, token: SessionCookie = None, days: Annotated[int, Query(ge=1, le=31)] = 7
) -> Response:
    scope = await _scope(request, services, token)
    start = (services.now() // 86400 - days + 1) * 86400
    return json_response(await uc.usage_report(services, scope, start))
