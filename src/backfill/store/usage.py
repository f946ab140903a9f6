"""Usage rows (docs/usage.md): added to in the transaction that writes what they count, read for the reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill.domain.batches import RequestState
from backfill.domain.usage_report import EndedBatch, UsageCounts, UsageKey, UsageKind, UsageRows
from backfill.store.tables import batches, requests, usage_minutes

_KEY = ("start_time", "tenant_id", "model", "kind")
_COUNTS = tuple(name for name in UsageCounts().as_dict())
# When each terminal status was set: a batch ended at the one of its status.
_ENDED_AT = {
    "completed": batches.c.completed_at,
    "failed": batches.c.failed_at,
    "expired": batches.c.expired_at,
    "cancelled": batches.c.cancelled_at,
}


async def add_usage(conn: AsyncConnection, rows: Mapping[UsageKey, UsageCounts]) -> None:
    """Add to the rows (made if new), in key order: every writer locks them in the same order, after the batch rows
    its transaction moved, so two group commits never wait on each other in a cycle."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(usage_minutes)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={name: usage_minutes.c[name] + stmt.excluded[name] for name in _COUNTS},
    )
    params = [
        {"start_time": key.start_time, "tenant_id": key.tenant_id, "model": key.model, "kind": key.kind.value}
        | counts.as_dict()
        for key, counts in sorted(rows.items())
    ]
    await conn.execute(stmt, params)


class UsageQueries:
    engine: AsyncEngine

    async def add_usage(self, rows: Mapping[UsageKey, UsageCounts]) -> None:
        """Add interactive requests' counts (the proxy's flush)."""
        async with self.engine.begin() as conn:
            await add_usage(conn, rows)

    async def usage_rows(self, start: int, end: int, tenant_id: str | None = None) -> UsageRows:
        """Rows whose minute is in [start, end), of one tenant or all."""
        query = select(usage_minutes).where(usage_minutes.c.start_time >= start, usage_minutes.c.start_time < end)
        if tenant_id is not None:
            query = query.where(usage_minutes.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(*(usage_minutes.c[name] for name in _KEY)))).all()
        return [
            (
                UsageKey(row.tenant_id, row.model, row.start_time, UsageKind(row.kind)),
                UsageCounts(*(int(getattr(row, name)) for name in _COUNTS)),
            )
            for row in rows
        ]

    async def ended_batches(self, start: int, end: int, tenant_id: str | None = None) -> list[EndedBatch]:
        """Batches (and message batches) that reached a terminal status in [start, end), with their expired lines."""
        ended_in = or_(
            *(and_(batches.c.status == status, column >= start, column < end) for status, column in _ENDED_AT.items())
        )
        ended_at = func.coalesce(*_ENDED_AT.values())
        query = select(
            batches.c.id,
            batches.c.tenant_id,
            batches.c.completion_window,
            batches.c.status,
            batches.c.created_at,
            ended_at.label("ended_at"),
            batches.c.expires_at,
        ).where(ended_in)
        if tenant_id is not None:
            query = query.where(batches.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            expired = await _expired_lines(conn, [row.id for row in rows])
        return [
            EndedBatch(
                row.tenant_id,
                row.completion_window,
                row.status,
                int(row.created_at),
                int(row.ended_at),
                int(row.expires_at),
                expired.get(row.id, 0),
            )
            for row in rows
        ]


async def _expired_lines(conn: AsyncConnection, batch_ids: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for at in range(0, len(batch_ids), 500):
        chunk = batch_ids[at : at + 500]
        rows = await conn.execute(
            select(requests.c.batch_id, func.count())
            .where(requests.c.batch_id.in_(chunk), requests.c.state == RequestState.EXPIRED.value)
            .group_by(requests.c.batch_id)
        )
        counts.update({row[0]: int(row[1]) for row in rows})
    return counts
