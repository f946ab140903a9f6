"""Usage, cost and SLA reports (docs/usage.md), in the shape of OpenAI's Usage and Costs APIs: an admin key sees
every tenant (`project_id` is the tenant's name), a tenant's key its own usage only.

Not in /openapi.json, like the admin API: the SDKs have no methods for these."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from backfill.errors import InvalidRequest
from backfill.http.deps import CallerDep, ServicesDep, json_response
from backfill.usecases import usage as uc

router = APIRouter(prefix="/v1/organization", tags=["usage"], include_in_schema=False)


def _list(request: Request, name: str) -> list[str]:
    """A list parameter given repeated (`group_by=a&group_by=b`), with brackets (`group_by[]=a`) or comma-separated."""
    values = request.query_params.getlist(name) + request.query_params.getlist(f"{name}[]")
    return [item for value in values for item in value.split(",") if item]


def _required_int(request: Request, name: str) -> int:
    value = _int(request, name)
    if value is None:
        raise InvalidRequest(f"Missing required parameter: {name}.", param=name, code="missing_required_parameter")
    return value


def _int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {value!r}.", param=name) from None


def _bool(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if value.lower() not in ("true", "false"):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}.", param=name)
    return value.lower() == "true"


def query_of(request: Request, default_width: str = "1d") -> uc.ReportQuery:
    return uc.ReportQuery(
        start_time=_required_int(request, "start_time"),
        end_time=_int(request, "end_time"),
        bucket_width=request.query_params.get("bucket_width", default_width),
        group_by=_list(request, "group_by"),
        limit=_int(request, "limit"),
        page=request.query_params.get("page"),
        project_ids=_list(request, "project_ids"),
        models=_list(request, "models"),
        batch=_bool(request, "batch"),
        completion_windows=_list(request, "completion_windows"),
    )


@router.get("/usage/completions")
async def completions_usage(request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    tenant = None if caller.admin else caller.tenant_id
    return json_response(await uc.completions_usage(services, tenant, query_of(request)))


@router.get("/costs")
async def costs(request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    tenant = None if caller.admin else caller.tenant_id
    return json_response(await uc.costs(services, tenant, query_of(request)))


@router.get("/usage/batch_slas")
async def batch_slas(request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    tenant = None if caller.admin else caller.tenant_id
    return json_response(await uc.batch_slas(services, tenant, query_of(request)))
