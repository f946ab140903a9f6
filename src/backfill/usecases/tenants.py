"""Admin use cases: tenants (fair-share weight, quotas) and API keys. The admin API and the CLI both call these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backfill import ids
from backfill.domain.bodies import json_kind
from backfill.domain.keys import make_key
from backfill.domain.tenants import DEFAULT_TENANT, QUOTAS, KeyInfo, Tenant, TenantChange
from backfill.errors import InvalidRequest, NotFound
from backfill.usecases import params
from backfill.usecases.deps import BatchDeps

_QUOTA = Field(default=None, ge=1)


class TenantFields(BaseModel):
    """Weight and quotas; a quota left out or null is no limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weight: float | None = Field(default=None, gt=0, description="Fair-share weight (default 1).")
    enqueued_token_limit: int | None = Field(
        default=None, ge=1, description="Estimated prompt tokens of unfinished lines, for each model."
    )
    max_batches_in_progress: int | None = Field(default=None, ge=1, description="Batches that have not ended.")
    batch_creates_per_minute: int | None = _QUOTA
    batch_tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Estimated prompt tokens of batches started in the last minute."
    )


class CreateTenant(TenantFields):
    """The body of `POST /v1/admin/tenants`."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")


class CreateKey(BaseModel):
    """The body of `POST /v1/admin/keys`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: str = Field(default=DEFAULT_TENANT, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    admin: bool = False
    open_mode_tenant: str = Field(
        default=DEFAULT_TENANT,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="For the first key: the tenant that gets the files and batches made in open mode.",
    )


def parse(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"Invalid type for the request body: expected an object, but got {json_kind(payload)} instead.",
            code="invalid_type",
        )
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise params.from_validation_error(dict(exc.errors()[0])) from None


def change_of(fields: TenantFields) -> TenantChange:
    """What an update sets: the fields given; a quota given as null is cleared."""
    given = fields.model_fields_set
    quotas = {name: getattr(fields, name) for name in QUOTAS if name in given and getattr(fields, name) is not None}
    cleared = frozenset(name for name in QUOTAS if name in given and getattr(fields, name) is None)
    return TenantChange(weight=fields.weight, quotas=quotas, cleared=cleared)


async def create_tenant(deps: BatchDeps, request: CreateTenant) -> Tenant:
    quotas = {name: getattr(request, name) for name in QUOTAS}
    if quotas["enqueued_token_limit"] is None:
        quotas["enqueued_token_limit"] = deps.settings.default_enqueued_token_limit
    tenant = Tenant(
        id=ids.new_id("tenant_", 8),
        name=request.name,
        weight=request.weight if request.weight is not None else 1.0,
        created_at=deps.now(),
        **quotas,
    )
    await deps.store.create_tenant(tenant)
    return tenant


async def get_tenant(deps: BatchDeps, name: str) -> Tenant:
    tenant = await deps.store.get_tenant(name)
    if tenant is None:
        raise NotFound(f"No such tenant: {name}", param="tenant")
    return tenant


async def update_tenant(deps: BatchDeps, name: str, fields: TenantFields) -> Tenant:
    tenant = await get_tenant(deps, name)
    return await deps.store.update_tenant(tenant.id, change_of(fields))


@dataclass(frozen=True)
class OpenModeEnded:
    """The first key was created: every request needs a key from now on, and what open mode made belongs to
    `tenant`. `moved`: the files and batches moved there, if they were moved."""

    tenant: str
    moved: tuple[int, int] | None = None

    def describe(self) -> str:
        ended = "open mode ends: from now on every request needs an API key."
        if self.moved is not None:
            files, batches = self.moved
            return f"{ended} The {files} files and {batches} batches made in open mode now belong to {self.tenant!r}."
        return (
            f"{ended} Files and batches made in open mode belong to tenant {self.tenant!r}: a key of that tenant "
            "reaches them (--open-mode-tenant NAME gives them to another tenant instead)."
        )


@dataclass(frozen=True)
class CreatedKey:
    key: KeyInfo
    plaintext: str  # shown once, never stored
    open_mode_ended: OpenModeEnded | None = None

    def to_dict(self) -> dict[str, Any]:
        shown = {**self.key.to_dict(), "key": self.plaintext}
        if self.open_mode_ended is not None:
            ended = self.open_mode_ended
            shown["open_mode_ended"] = {"tenant": ended.tenant, "message": ended.describe()}
        return shown


async def create_key(deps: BatchDeps, request: CreateKey) -> CreatedKey:
    """A new key of the tenant (created if new). The first key ends open mode and gives what open mode made to
    `request.open_mode_tenant`."""
    store, now = deps.store, deps.now()
    first = await store.count_api_keys() == 0
    tenant_id = await store.ensure_tenant(request.tenant, now, deps.settings.default_enqueued_token_limit)
    ended = await _end_open_mode(deps, request.open_mode_tenant) if first else None
    key = make_key()
    key_id = await store.add_api_key(tenant_id, key, now, admin=request.admin)
    info = await store.find_key(key_id)
    assert info is not None
    return CreatedKey(info, key.plaintext, ended)


async def _end_open_mode(deps: BatchDeps, to_tenant: str) -> OpenModeEnded:
    open_tenant = await deps.store.get_tenant(DEFAULT_TENANT)
    if to_tenant == DEFAULT_TENANT:
        return OpenModeEnded(DEFAULT_TENANT)
    target = await deps.store.ensure_tenant(to_tenant, deps.now(), deps.settings.default_enqueued_token_limit)
    moved = await deps.store.move_tenant_data(open_tenant.id, target) if open_tenant is not None else (0, 0)
    return OpenModeEnded(to_tenant, moved)


async def list_keys(deps: BatchDeps, tenant: str | None = None) -> list[KeyInfo]:
    tenant_id = (await get_tenant(deps, tenant)).id if tenant is not None else None
    return await deps.store.list_keys(tenant_id)


async def get_key(deps: BatchDeps, key_ref: str) -> KeyInfo:
    key = await deps.store.find_key(key_ref)
    if key is None:
        raise NotFound(f"No such API key: {key_ref}", param="key_id")
    return key


async def revoke_key(deps: BatchDeps, key_ref: str) -> KeyInfo:
    """Revoke the key (by id or prefix); every process refuses it within a few seconds. Revoking twice is fine."""
    key = await get_key(deps, key_ref)
    await deps.store.revoke_key(key.id, deps.now())
    return await get_key(deps, key.id)


async def rotate_key(deps: BatchDeps, key_ref: str) -> CreatedKey:
    """A new key for the same tenant, as admin as the old one, which is revoked."""
    old = await get_key(deps, key_ref)
    if old.revoked_at is not None:
        raise InvalidRequest(f"API key {old.id} is revoked already; create a new one.", param="key_id")
    key = make_key()
    key_id = await deps.store.add_api_key(old.tenant_id, key, deps.now(), admin=old.admin)
    await deps.store.revoke_key(old.id, deps.now())
    return CreatedKey(await get_key(deps, key_id), key.plaintext)
