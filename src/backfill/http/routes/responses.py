"""Background Responses calls and flex calls (docs/flex.md).

The proxy hands a call here when it asks for `background: true` (/v1/responses) or `service_tier: "flex"`
(/v1/chat/completions, /v1/completions, /v1/responses): it runs as a one-line batch (`usecases.responses`).
A background call is answered at once with its `queued` Response object; `GET /v1/responses/{id}` and
`POST /v1/responses/{id}/cancel` read and stop it. A flex call is answered when its line has run, with the
engine's answer, or 429 `resource_unavailable` if no capacity started it within `flex_timeout_s`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import Receive

from backfill.domain import background
from backfill.domain.batches import BatchApi, RequestState
from backfill.domain.results import StoredResult
from backfill.http.deps import ServicesDep, TenantDep, json_response
from backfill.http.errors import error_response
from backfill.http.openapi import ok, openai_errors
from backfill.http.schemas import EngineAnswer
from backfill.services import Services
from backfill.usecases import responses as uc

router = APIRouter(prefix="/v1/responses", tags=["interactive"])


# The proxy's `_unless_gone`: the result of the work, or (None, True) once the client has gone.
UnlessGone = Callable[[Receive, Awaitable[StoredResult]], Awaitable[tuple[StoredResult | None, bool]]]


async def run_deferred(
    request: Request,
    services: Services,
    tenant_id: str,
    endpoint: str,
    body: dict[str, Any],
    *,
    flex: bool,
    unless_gone: UnlessGone,
) -> Response:
    """A background call (answered `queued` at once) or else a flex call (answered once it has run)."""
    if not flex or body.get("background") is True:
        response_id = await uc.submit(services, tenant_id, endpoint, body, BatchApi.RESPONSES)
        services.work_changed()
        return json_response(await uc.get_response(services, tenant_id, response_id))
    batch_id = await uc.submit(services, tenant_id, endpoint, body, BatchApi.FLEX)
    services.work_changed()
    wait = uc.await_flex(services, tenant_id, batch_id, services.settings.flex_timeout_s, services.clock)
    line, gone = await unless_gone(request.receive, wait)
    if line is None or gone:
        await uc.cancel_quietly(services, tenant_id, batch_id)
        return Response(status_code=499)  # nobody reads it
    if line.state is RequestState.SUCCEEDED:
        return Response(background.flex_answer(line.body, endpoint, body), media_type="application/json")
    if line.body is not None and line.status_code is not None:  # the engine's own refusal
        return Response(line.body, status_code=line.status_code, media_type="application/json")
    return error_response(502, background.error_message(line), error_type="server_error", code=line.error_code)


@router.get(
    "/{response_id}",
    responses=ok(EngineAnswer, "The Response object of a background call.") | openai_errors(404),
)
async def retrieve_response(response_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    return json_response(await uc.get_response(services, tenant, response_id))


@router.post(
    "/{response_id}/cancel",
    responses=ok(EngineAnswer, "The Response object, `cancelled`.") | openai_errors(400, 404),
)
async def cancel_response(response_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    shown = await uc.cancel_response(services, tenant, response_id)
    services.work_changed()
    return json_response(shown)


def deferred_of(endpoint: str, data: bytes) -> tuple[dict[str, Any], bool] | None:
    """(body, flex) of a call to run as a one-line batch, or None for a plain interactive one. Only a body that
    mentions `background` or `flex` is parsed twice."""
    if b'"background"' not in data and b'"flex"' not in data:
        return None
    body = orjson.loads(data)  # parse_head has read it already
    is_background, flex = background.is_deferred(endpoint, body)
    return (body, flex) if is_background or flex else None
