"""Admin API (docs/tenants.md, docs/webhooks.md): tenants, API keys and webhook endpoints, for admin keys only
(anyone in open mode, on loopback).

Not in /openapi.json: it is backfill's own surface, no SDK's, and its callers are `backfill tenants` / `keys`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from backfill.http.deps import AdminDep, ServicesDep, json_body, json_response
from backfill.usecases import tenants as uc
from backfill.usecases import webhooks

router = APIRouter(prefix="/v1/admin", tags=["admin"], include_in_schema=False)


def _list(items: list[Any]) -> Response:
    return json_response({"object": "list", "data": [item.to_dict() for item in items], "has_more": False})


@router.post("/tenants")
async def create_tenant(request: Request, services: ServicesDep, _: AdminDep) -> Response:
    request_body = uc.parse(uc.CreateTenant, await json_body(request))
    return json_response((await uc.create_tenant(services, request_body)).to_dict())


@router.get("/tenants")
async def list_tenants(services: ServicesDep, _: AdminDep) -> Response:
    return _list(await services.store.list_tenants())


@router.get("/tenants/{name}")
async def retrieve_tenant(name: str, services: ServicesDep, _: AdminDep) -> Response:
    return json_response((await uc.get_tenant(services, name)).to_dict())


@router.post("/tenants/{name}")
async def update_tenant(name: str, request: Request, services: ServicesDep, _: AdminDep) -> Response:
    fields = uc.parse(uc.TenantFields, await json_body(request))
    return json_response((await uc.update_tenant(services, name, fields)).to_dict())


@router.post("/keys")
async def create_key(request: Request, services: ServicesDep, _: AdminDep) -> Response:
    created = await uc.create_key(services, uc.parse(uc.CreateKey, await json_body(request)))
    return json_response(created.to_dict())


@router.get("/keys")
async def list_keys(services: ServicesDep, _: AdminDep, tenant: str | None = None) -> Response:
    return _list(await uc.list_keys(services, tenant))


@router.get("/keys/{key_id}")
async def retrieve_key(key_id: str, services: ServicesDep, _: AdminDep) -> Response:
    return json_response((await uc.get_key(services, key_id)).to_dict())


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, services: ServicesDep, _: AdminDep) -> Response:
    return json_response((await uc.revoke_key(services, key_id)).to_dict())


@router.post("/keys/{key_id}/rotate")
async def rotate_key(key_id: str, services: ServicesDep, _: AdminDep) -> Response:
    return json_response((await uc.rotate_key(services, key_id)).to_dict())


@router.post("/tenants/{name}/webhooks")
async def create_webhook(name: str, request: Request, services: ServicesDep, _: AdminDep) -> Response:
    body = uc.parse(webhooks.CreateWebhook, await json_body(request))
    endpoint = await webhooks.create_endpoint(services, name, body)
    return json_response(endpoint.to_dict(with_secret=True))  # the only time the secret is shown


@router.get("/tenants/{name}/webhooks")
async def list_webhooks(name: str, services: ServicesDep, _: AdminDep) -> Response:
    return _list(await webhooks.list_endpoints(services, name))


@router.delete("/tenants/{name}/webhooks/{endpoint_id}")
async def delete_webhook(name: str, endpoint_id: str, services: ServicesDep, _: AdminDep) -> Response:
    await webhooks.delete_endpoint(services, name, endpoint_id)
    return json_response({"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True})


@router.get("/webhooks/dead")
async def list_dead_webhooks(
    services: ServicesDep, _: AdminDep, tenant: str | None = None, limit: int = Query(default=100, ge=1, le=1000)
) -> Response:
    return _list(await webhooks.list_deliveries(services, "dead", tenant, limit))


@router.get("/webhooks/deliveries")
async def list_webhook_deliveries(
    services: ServicesDep,
    _: AdminDep,
    state: str = "pending",
    tenant: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Response:
    return _list(await webhooks.list_deliveries(services, state, tenant, limit))


@router.post("/webhooks/dead/{delivery_id}/retry")
async def retry_dead_webhook(delivery_id: int, services: ServicesDep, _: AdminDep) -> Response:
    await webhooks.redeliver(services, delivery_id)
    return json_response({"id": delivery_id, "object": "webhook_delivery", "state": "pending"})
