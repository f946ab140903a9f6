"""Tenants and API keys in SQL: the admin API's queries, authentication's, and the quota checks at create."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import Row, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill import ids
from backfill.domain.batches import TERMINAL
from backfill.domain.keys import KEY_PREFIX, NewKey
from backfill.domain.tenants import (
    CREATES_WINDOW_S,
    QUOTAS,
    KeyInfo,
    KeyMatch,
    Tenant,
    TenantChange,
    check_token_rate,
    create_refusal,
)
from backfill.errors import Conflict, NotFound
from backfill.store.tables import api_keys, batches, files, idempotency_keys, tenants

_TERMINAL = [status.value for status in TERMINAL]
_ID_CHUNK = 500


def tenant_from_row(row: Row[Any]) -> Tenant:
    return Tenant(
        id=row.id,
        name=row.name,
        weight=float(row.weight),
        created_at=int(row.created_at),
        **{name: (int(row._mapping[name]) if row._mapping[name] is not None else None) for name in QUOTAS},
    )


def _key_from_row(row: Any) -> KeyInfo:  # a Row of _KEY_COLUMNS
    return KeyInfo(
        id=row.id,
        prefix=f"{KEY_PREFIX}{row.prefix}",
        tenant_id=row.tenant_id,
        tenant=row.name,
        admin=bool(row.is_admin),
        created_at=int(row.created_at),
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.prefix,
    api_keys.c.tenant_id,
    tenants.c.name,
    api_keys.c.is_admin,
    api_keys.c.created_at,
    api_keys.c.last_used_at,
    api_keys.c.revoked_at,
)


async def locked_tenant(conn: AsyncConnection, tenant_id: str) -> Tenant | None:
    """The tenant's row, locked until the transaction ends (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises)."""
    row = (await conn.execute(select(tenants).where(tenants.c.id == tenant_id).with_for_update())).first()
    return tenant_from_row(row) if row else None


async def check_create_quota(conn: AsyncConnection, tenant_id: str, now: int) -> None:
    """Raise QuotaExceeded if one more batch would take the tenant over its batches in progress or creates per
    minute. Under a lock on the tenant row, so two creates at once cannot both slip under a limit."""
    tenant = await locked_tenant(conn, tenant_id)
    if tenant is None or (tenant.max_batches_in_progress is None and tenant.batch_creates_per_minute is None):
        return
    mine = batches.c.tenant_id == tenant_id
    open_batches = int(
        await conn.scalar(select(func.count()).select_from(batches).where(mine, batches.c.status.not_in(_TERMINAL)))
        or 0
    )
    recent = [
        int(created)
        for created in await conn.scalars(
            select(batches.c.created_at).where(mine, batches.c.created_at > now - CREATES_WINDOW_S)
        )
    ]
    if (refusal := create_refusal(tenant, open_batches, recent, now)) is not None:
        raise refusal


async def check_start_rate(conn: AsyncConnection, tenant: Tenant, wanted: int, now: int) -> None:
    """Raise TokenRateExceeded if a batch of `wanted` prompt tokens, started now, would take the tenant over its
    batch tokens per minute."""
    if tenant.batch_tokens_per_minute is None:
        return
    started = await conn.scalar(
        select(func.coalesce(func.sum(batches.c.est_prompt_tokens), 0)).where(
            batches.c.tenant_id == tenant.id, batches.c.in_progress_at > now - CREATES_WINDOW_S
        )
    )
    check_token_rate(tenant, int(started or 0), wanted)


class TenantQueries:
    engine: AsyncEngine

    async def add_api_key(self, tenant_id: str, key: NewKey, now: int, *, admin: bool = False) -> str:
        """Store the key (its prefix and salted hash); its id."""
        key_id = ids.new_id("key_", 8)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    tenant_id=tenant_id,
                    prefix=key.prefix,
                    salt=key.salt,
                    key_hash=key.key_hash,
                    created_at=now,
                    is_admin=admin,
                )
            )
        return key_id

    async def key_candidates(self, prefix: str) -> list[KeyMatch]:
        """Live keys with this prefix."""
        query = select(
            api_keys.c.id, api_keys.c.salt, api_keys.c.key_hash, api_keys.c.tenant_id, api_keys.c.is_admin
        ).where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [KeyMatch(row.id, row.salt, row.key_hash, row.tenant_id, bool(row.is_admin)) for row in rows]

    async def count_api_keys(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(api_keys)) or 0)

    async def revoked_among(self, key_ids: Collection[str]) -> set[str]:
        """Which of these keys are revoked (or gone)."""
        wanted = list(key_ids)
        live: set[str] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(wanted), _ID_CHUNK):
                chunk = wanted[start : start + _ID_CHUNK]
                live.update(
                    await conn.scalars(
                        select(api_keys.c.id).where(api_keys.c.id.in_(chunk), api_keys.c.revoked_at.is_(None))
                    )
                )
        return set(wanted) - live

    async def record_key_use(self, last_used: Mapping[str, int]) -> None:
        """Set each key's `last_used_at` (never back in time)."""
        if not last_used:
            return
        async with self.engine.begin() as conn:
            for key_id, when in last_used.items():
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .where(or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < when))
                    .values(last_used_at=when)
                )

    async def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        query = select(*_KEY_COLUMNS).select_from(api_keys.join(tenants, tenants.c.id == api_keys.c.tenant_id))
        if tenant_id is not None:
            query = query.where(api_keys.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(api_keys.c.created_at, api_keys.c.id))
            return [_key_from_row(row) for row in rows]

    async def find_key(self, key_id: str) -> KeyInfo | None:
        """The key with this id, or this prefix (`bf-` and the 12 characters after it)."""
        prefix = key_id.removeprefix(KEY_PREFIX)
        query = (
            select(*_KEY_COLUMNS)
            .select_from(api_keys.join(tenants, tenants.c.id == api_keys.c.tenant_id))
            .where(or_(api_keys.c.id == key_id, api_keys.c.prefix == prefix))
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _key_from_row(row) if row else None

    async def revoke_key(self, key_id: str, now: int) -> bool:
        """Revoke the key; False if it was revoked already."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            return result.rowcount == 1

    async def create_tenant(self, tenant: Tenant) -> None:
        """Insert the tenant; Conflict if one has its name."""
        values = {name: getattr(tenant, name) for name in ("id", "name", "weight", "created_at", *QUOTAS)}
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(tenants).values(**values))
        except IntegrityError:
            raise Conflict(f"A tenant named {tenant.name!r} exists already.") from None

    async def get_tenant(self, name_or_id: str) -> Tenant | None:
        query = select(tenants).where(or_(tenants.c.name == name_or_id, tenants.c.id == name_or_id))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return tenant_from_row(row) if row else None

    async def list_tenants(self) -> list[Tenant]:
        async with self.engine.connect() as conn:
            return [tenant_from_row(row) for row in await conn.execute(select(tenants).order_by(tenants.c.name))]

    async def update_tenant(self, tenant_id: str, change: TenantChange) -> Tenant:
        values: dict[str, Any] = {name: None for name in change.cleared}
        values.update(change.quotas or {})
        if change.weight is not None:
            values["weight"] = change.weight
        async with self.engine.begin() as conn:
            if values:
                await conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(**values))
            row = (await conn.execute(select(tenants).where(tenants.c.id == tenant_id))).first()
        if row is None:
            raise NotFound(f"No such tenant: {tenant_id}", param="tenant")
        return tenant_from_row(row)

    async def move_tenant_data(self, from_tenant_id: str, to_tenant_id: str) -> tuple[int, int]:
        """Give every file and batch of one tenant to another, in one transaction; (files, batches) moved."""
        async with self.engine.begin() as conn:
            moved_files = await conn.execute(
                update(files).where(files.c.tenant_id == from_tenant_id).values(tenant_id=to_tenant_id)
            )
            moved_batches = await conn.execute(
                update(batches).where(batches.c.tenant_id == from_tenant_id).values(tenant_id=to_tenant_id)
            )
            # Idempotency records replay answers that name the moved objects: they belong to the new owner too,
            # unless it has a record under the same key (then the old one is dropped with its tenant's view).
            taken = select(idempotency_keys.c.key).where(idempotency_keys.c.tenant_id == to_tenant_id)
            await conn.execute(
                update(idempotency_keys)
                .where(idempotency_keys.c.tenant_id == from_tenant_id, idempotency_keys.c.key.not_in(taken))
                .values(tenant_id=to_tenant_id)
            )
        return moved_files.rowcount, moved_batches.rowcount
