"""Admin use cases for webhooks (docs/webhooks.md): endpoints per tenant, and the dead letters. The admin API and
`backfill webhooks` both call these."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backfill import ids
from backfill.domain.tenants import DEFAULT_TENANT
from backfill.domain.webhooks import (
    DeliveryRecord,
    DeliveryState,
    WebhookEndpoint,
    config_endpoint_id,
    new_secret,
)
from backfill.errors import InvalidRequest, NotFound
from backfill.usecases.deps import BatchDeps
from backfill.usecases.tenants import get_tenant


class CreateWebhook(BaseModel):
    """The body of `POST /v1/admin/tenants/{tenant}/webhooks`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048, description="Where events are POSTed (http or https).")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an absolute http:// or https:// URL, got {url!r}")
        return url


async def _tenant_id(deps: BatchDeps, tenant: str) -> str:
    if tenant == DEFAULT_TENANT:  # open mode's tenant exists from the first request on; maybe not yet
        return await deps.store.ensure_tenant(tenant, deps.now(), deps.settings.default_enqueued_token_limit)
    return (await get_tenant(deps, tenant)).id


async def create_endpoint(deps: BatchDeps, tenant: str, request: CreateWebhook) -> WebhookEndpoint:
    """A new endpoint of the tenant, with a fresh `whsec_` secret (the caller shows it once)."""
    endpoint = WebhookEndpoint(
        id=ids.new_id("whep_"),
        tenant_id=await _tenant_id(deps, tenant),
        url=request.url,
        secret=new_secret(),
        created_at=deps.now(),
    )
    await deps.store.add_webhook_endpoint(endpoint)
    return endpoint


async def sync_config_endpoints(deps: BatchDeps) -> None:
    """Bring the `[[webhooks]]` of the config into the store (at every start); their tenants are made if new."""
    endpoints = []
    for entry in deps.settings.webhooks:
        tenant_id = await deps.store.ensure_tenant(entry.tenant, deps.now(), deps.settings.default_enqueued_token_limit)
        endpoint_id = config_endpoint_id(entry.tenant, entry.url)
        endpoints.append(WebhookEndpoint(endpoint_id, tenant_id, entry.url, entry.secret(), deps.now()))
    await deps.store.sync_config_endpoints(endpoints)


async def list_endpoints(deps: BatchDeps, tenant: str | None = None) -> list[WebhookEndpoint]:
    tenant_id = (await get_tenant(deps, tenant)).id if tenant is not None else None
    return await deps.store.list_webhook_endpoints(tenant_id)


async def delete_endpoint(deps: BatchDeps, tenant: str, endpoint_id: str) -> None:
    """Remove the endpoint; its pending and dead deliveries go with it."""
    if not await deps.store.delete_webhook_endpoint((await get_tenant(deps, tenant)).id, endpoint_id):
        raise NotFound(f"Tenant {tenant} has no webhook endpoint {endpoint_id}.", param="endpoint_id")


async def list_deliveries(
    deps: BatchDeps, state: str = DeliveryState.DEAD.value, tenant: str | None = None, limit: int = 100
) -> list[DeliveryRecord]:
    """Deliveries in `state`, newest first: by default the dead letters, given up on after the retry horizon."""
    try:
        wanted = DeliveryState(state)
    except ValueError:
        choices = ", ".join(s.value for s in DeliveryState)
        raise InvalidRequest(f"state must be one of {choices}; got {state!r}.", param="state") from None
    tenant_id = (await get_tenant(deps, tenant)).id if tenant is not None else None
    return await deps.store.list_deliveries(wanted, tenant_id, limit)


async def redeliver(deps: BatchDeps, seq: int) -> None:
    """Send a dead letter once more, now (with its event's id)."""
    if not await deps.store.redeliver(seq, float(deps.now())):
        raise NotFound(f"No dead webhook delivery {seq}.", param="delivery_id")
