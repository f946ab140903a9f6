"""Request-scoped dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Header, Request
from fastapi.responses import Response

from backfill.errors import InvalidRequest, PayloadTooLarge
from backfill.http.auth import Authenticator, bearer_token
from backfill.services import Services

MAX_JSON_BODY_BYTES = 1024 * 1024


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def tenant_of(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    return await authenticator.tenant_for(bearer_token(authorization))


ServicesDep = Annotated[Services, Depends(services_of)]
TenantDep = Annotated[str, Depends(tenant_of)]


async def json_body(request: Request, max_bytes: int = MAX_JSON_BODY_BYTES) -> Any:
    """Read and parse a JSON body ourselves: bounded size, and orjson rejects absurd nesting cleanly."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"The request body is larger than {max_bytes} bytes.", code="request_too_large")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")
