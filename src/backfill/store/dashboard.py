"""What the dashboard reads: batches of every API across tenants, filtered, and a batch's errors by code."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from backfill.domain.batches import Batch, RequestState
from backfill.store.rows import batch_from_row
from backfill.store.tables import batches, requests, tenants


@dataclass(frozen=True)
class BatchFilter:
    """Which batches a list shows; None: any. `tenant_id` None only for an admin."""

    tenant_id: str | None = None
    status: str | None = None
    model: str | None = None
    metadata: str | None = None  # a substring of the metadata's JSON text, e.g. `"team": "eval"`


@dataclass(frozen=True)
class ErrorGroup:
    code: str
    count: int
    examples: list[tuple[str, str]]  # (custom_id, message)


class DashboardQueries:
    """Named read-only queries for /ui; runs on the read engine when there is one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def list_batches(self, where: BatchFilter, limit: int) -> list[tuple[Batch, str]]:
        """Newest first, with each batch's tenant name."""
        conditions = []
        if where.tenant_id is not None:
            conditions.append(batches.c.tenant_id == where.tenant_id)
        if where.status:
            conditions.append(batches.c.status == where.status)
        if where.model:
            conditions.append(batches.c.model == where.model)
        if where.metadata:
            conditions.append(batches.c.metadata.contains(where.metadata, autoescape=True))
        query = (
            select(batches, tenants.c.name.label("tenant_name"))
            .join(tenants, tenants.c.id == batches.c.tenant_id)
            .where(and_(True, *conditions))
            .order_by(batches.c.seq.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [(batch_from_row(row), row.tenant_name) for row in rows]

    async def tenant_names(self) -> dict[str, str]:
        async with self.engine.connect() as conn:
            return {row.id: row.name for row in await conn.execute(select(tenants.c.id, tenants.c.name))}

    async def error_groups(self, batch_id: str, examples: int = 3) -> list[ErrorGroup]:
        """The batch's lines that ended in error, grouped by error code (`http_<status>` when the backend answered
        with an error status), most frequent first, with a few examples each."""
        ended_in_error = and_(
            requests.c.batch_id == batch_id,
            or_(requests.c.error_code.is_not(None), requests.c.state == RequestState.FAILED.value),
        )
        counts = (
            select(requests.c.error_code, requests.c.status_code, func.count())
            .where(ended_in_error)
            .group_by(requests.c.error_code, requests.c.status_code)
            .order_by(func.count().desc())
            .limit(20)
        )
        async with self.engine.connect() as conn:
            groups = []
            for code, status, count in (await conn.execute(counts)).all():
                same = and_(
                    ended_in_error,
                    requests.c.error_code == code if code is not None else requests.c.error_code.is_(None),
                    requests.c.status_code == status if status is not None else requests.c.status_code.is_(None),
                )
                sample = select(requests.c.custom_id, requests.c.error_message).where(same)
                rows = (await conn.execute(sample.order_by(requests.c.line_no).limit(examples))).all()
                label = code or (f"http_{status}" if status is not None else "unknown")
                groups.append(ErrorGroup(label, int(count), [(row[0], row[1] or "") for row in rows]))
        return groups
