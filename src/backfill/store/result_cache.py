"""The result cache (domain.result_cache): kept in the group commit that writes the lines it comes from (which also
marks reused entries used, for the LRU order), looked up with a plain read, trimmed to a number of entries per
tenant."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill.domain.leases import LineUpdate
from backfill.domain.result_cache import CachedResult
from backfill.domain.usage import Usage
from backfill.store.tables import result_cache

_TOKENS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")
_TOUCH = (
    update(result_cache)
    .where(result_cache.c.tenant_id == bindparam("_tenant_id"), result_cache.c.key == bindparam("_key"))
    .values(used_at=bindparam("_at"))
)
_KEPT = ("result_id", "status_code", "request_id", "body", *_TOKENS, "created_at", "used_at")


async def keep_results(conn: AsyncConnection, kept: Sequence[tuple[str, LineUpdate]]) -> None:
    """Keep succeeded lines' answers under their `cache_key` for their tenant (a newer answer replaces an older
    one); lines answered from the cache mark their entry used instead. Rows are written in (tenant, key) order, the
    one lock order of every writer."""
    used = [
        {"_tenant_id": tenant_id, "_key": u.cache_key, "_at": int(u.finished_at)}
        for tenant_id, u in kept
        if u.cache_key is not None and u.cached_from is not None
    ]
    if used:
        await conn.execute(_TOUCH, sorted(used, key=lambda row: (str(row["_tenant_id"]), str(row["_key"]))))
    rows = [
        {
            "tenant_id": tenant_id,
            "key": u.cache_key,
            "result_id": u.result_id,
            "status_code": u.status_code,
            "request_id": u.request_id,
            "body": u.body,
            "input_tokens": u.usage.input_tokens,
            "cached_tokens": u.usage.cached_tokens,
            "output_tokens": u.usage.output_tokens,
            "reasoning_tokens": u.usage.reasoning_tokens,
            "created_at": int(u.finished_at),
            "used_at": int(u.finished_at),
        }
        for tenant_id, u in kept
        if u.cache_key is not None
        and u.cached_from is None
        and u.body is not None
        and u.status_code is not None
        and u.result_id is not None
    ]
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(result_cache)
    stmt = stmt.on_conflict_do_update(
        index_elements=["tenant_id", "key"], set_={name: stmt.excluded[name] for name in _KEPT}
    )
    await conn.execute(stmt, sorted(rows, key=lambda row: (str(row["tenant_id"]), str(row["key"]))))


class ResultCacheQueries:
    engine: AsyncEngine

    async def cached_result(self, tenant_id: str, key: str) -> CachedResult | None:
        """The answer kept under `key` for the tenant; None if there is none. A read: the entry is marked used by
        the group commit that records the line it answers."""
        query = select(*(result_cache.c[name] for name in ("result_id", "status_code", "request_id", "body", *_TOKENS)))
        query = query.where(result_cache.c.tenant_id == tenant_id, result_cache.c.key == key)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        usage = Usage(row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens)
        return CachedResult(row.result_id, row.status_code, row.request_id, bytes(row.body), usage)

    async def trim_result_cache(self, max_entries: int) -> int:
        """Drop each tenant's least recently used entries beyond `max_entries`; returns how many went."""
        dropped = 0
        async with self.engine.begin() as conn:
            over = await conn.execute(
                select(result_cache.c.tenant_id, func.count())
                .group_by(result_cache.c.tenant_id)
                .having(func.count() > max_entries)
            )
            for tenant_id, count in over.all():
                oldest = (
                    select(result_cache.c.key)
                    .where(result_cache.c.tenant_id == tenant_id)
                    .order_by(result_cache.c.used_at, result_cache.c.created_at)
                    .limit(int(count) - max_entries)
                )
                result = await conn.execute(
                    delete(result_cache).where(result_cache.c.tenant_id == tenant_id, result_cache.c.key.in_(oldest))
                )
                dropped += int(result.rowcount)
        return dropped
