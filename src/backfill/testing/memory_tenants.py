"""Tenants and API keys for InMemoryStore, behaving as `store.tenants` does."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from backfill import ids
from backfill.domain.batches import TERMINAL
from backfill.domain.keys import KEY_PREFIX, NewKey
from backfill.domain.tenants import (
    CREATES_WINDOW_S,
    KeyInfo,
    KeyMatch,
    Tenant,
    TenantChange,
    check_token_rate,
    create_refusal,
)
from backfill.errors import Conflict, NotFound
from backfill.testing.memory_tables import ConstraintViolation, KeyRow, MemoryTables


class MemoryTenants:
    tables: MemoryTables

    async def ensure_tenant(self, name: str, now: int, enqueued_token_limit: int | None = None) -> str:
        for tenant in self.tables.tenants.values():
            if tenant.name == name:
                return tenant.id
        tenant_id = ids.new_id("tenant_", 8)
        self.tables.tenants[tenant_id] = Tenant(tenant_id, name, 1.0, now, enqueued_token_limit=enqueued_token_limit)
        return tenant_id

    async def tenant_token_limit(self, tenant_id: str) -> int | None:
        tenant = self.tables.tenants.get(tenant_id)
        return tenant.enqueued_token_limit if tenant is not None else None

    async def create_tenant(self, tenant: Tenant) -> None:
        if any(other.name == tenant.name for other in self.tables.tenants.values()):
            raise Conflict(f"A tenant named {tenant.name!r} exists already.")
        self.tables.tenants[tenant.id] = tenant

    async def get_tenant(self, name_or_id: str) -> Tenant | None:
        for tenant in self.tables.tenants.values():
            if name_or_id in (tenant.id, tenant.name):
                return tenant
        return None

    async def list_tenants(self) -> list[Tenant]:
        return sorted(self.tables.tenants.values(), key=lambda tenant: tenant.name)

    async def update_tenant(self, tenant_id: str, change: TenantChange) -> Tenant:
        tenant = self.tables.tenants.get(tenant_id)
        if tenant is None:
            raise NotFound(f"No such tenant: {tenant_id}", param="tenant")
        values: dict[str, object] = {name: None for name in change.cleared}
        values.update(change.quotas or {})
        if change.weight is not None:
            values["weight"] = change.weight
        tenant = self.tables.tenants[tenant_id] = dataclasses.replace(tenant, **values)  # type: ignore[arg-type]
        return tenant

    async def move_tenant_data(self, from_tenant_id: str, to_tenant_id: str) -> tuple[int, int]:
        self.tables.require_tenant(to_tenant_id)
        moved_files = moved_batches = 0
        for file_id, row in list(self.tables.files.items()):
            if row.record.tenant_id == from_tenant_id:
                self.tables.files[file_id] = dataclasses.replace(
                    row, record=dataclasses.replace(row.record, tenant_id=to_tenant_id)
                )
                moved_files += 1
        for batch_row in self.tables.batches.values():
            if batch_row.batch.tenant_id == from_tenant_id:
                batch_row.batch.tenant_id = to_tenant_id
                moved_batches += 1
        return moved_files, moved_batches

    # --- keys -------------------------------------------------------------------------------------------------

    async def add_api_key(self, tenant_id: str, key: NewKey, now: int, *, admin: bool = False) -> str:
        self.tables.require_tenant(tenant_id)
        if key.prefix in self.tables.api_keys:
            raise ConstraintViolation(f"an API key with prefix {key.prefix!r} exists")
        row = KeyRow(ids.new_id("key_", 8), tenant_id, key.prefix, key.salt, key.key_hash, now, admin)
        self.tables.api_keys[key.prefix] = row
        return row.id

    async def key_candidates(self, prefix: str) -> list[KeyMatch]:
        key = self.tables.api_keys.get(prefix)
        if key is None or key.revoked_at is not None:
            return []
        return [KeyMatch(key.id, key.salt, key.key_hash, key.tenant_id, key.admin)]

    async def count_api_keys(self) -> int:
        return len(self.tables.api_keys)

    async def revoked_among(self, key_ids: Collection[str]) -> set[str]:
        live = {key.id for key in self.tables.api_keys.values() if key.revoked_at is None}
        return set(key_ids) - live

    async def record_key_use(self, last_used: Mapping[str, int]) -> None:
        for prefix, key in list(self.tables.api_keys.items()):
            when = last_used.get(key.id)
            if when is not None and (key.last_used_at is None or key.last_used_at < when):
                self.tables.api_keys[prefix] = dataclasses.replace(key, last_used_at=when)

    async def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        rows = [key for key in self.tables.api_keys.values() if tenant_id in (None, key.tenant_id)]
        return [self._key_info(key) for key in sorted(rows, key=lambda key: (key.created_at, key.id))]

    async def find_key(self, key_id: str) -> KeyInfo | None:
        prefix = key_id.removeprefix(KEY_PREFIX)
        for key in self.tables.api_keys.values():
            if key_id == key.id or prefix == key.prefix:
                return self._key_info(key)
        return None

    async def revoke_key(self, key_id: str, now: int) -> bool:
        for prefix, key in self.tables.api_keys.items():
            if key.id == key_id and key.revoked_at is None:
                self.tables.api_keys[prefix] = dataclasses.replace(key, revoked_at=now)
                return True
        return False

    def _key_info(self, key: KeyRow) -> KeyInfo:
        return KeyInfo(
            id=key.id,
            prefix=f"{KEY_PREFIX}{key.prefix}",
            tenant_id=key.tenant_id,
            tenant=self.tables.tenants[key.tenant_id].name,
            admin=key.admin,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )

    # --- quotas -----------------------------------------------------------------------------------------------

    def check_create_quota(self, tenant_id: str, now: int) -> None:
        tenant = self.tables.tenants.get(tenant_id)
        if tenant is None:
            return
        mine = [row.batch for row in self.tables.batches.values() if row.batch.tenant_id == tenant_id]
        open_batches = sum(1 for batch in mine if batch.status not in TERMINAL)
        recent = [batch.created_at for batch in mine if batch.created_at > now - CREATES_WINDOW_S]
        if (refusal := create_refusal(tenant, open_batches, recent, now)) is not None:
            raise refusal

    def check_start_rate(self, tenant_id: str, wanted: int, now: int) -> None:
        tenant = self.tables.tenants.get(tenant_id)
        if tenant is None:
            return
        started = sum(
            row.est_prompt_tokens
            for row in self.tables.batches.values()
            if row.batch.tenant_id == tenant_id
            and row.batch.in_progress_at is not None
            and row.batch.in_progress_at > now - CREATES_WINDOW_S
        )
        check_token_rate(tenant, started, wanted)
