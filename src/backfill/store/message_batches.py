"""Queries only message batches (SPEC §4) need: adding one with its refused requests, listing with two cursors,
counting lines that never ran, archiving and deleting. Everything else is shared with OpenAI batches."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from backfill.domain.batches import Batch, BatchApi, RequestState
from backfill.domain.message_batches import REFUSED, RefusedRequest, UnrunCounts
from backfill.errors import Conflict, NotFound
from backfill.store.rows import batch_from_row, batch_to_row
from backfill.store.tables import batches, requests
from backfill.store.tenants import check_create_quota


class MessageBatchQueries:
    engine: AsyncEngine

    async def add_message_batch(
        self, batch: Batch, refused: Sequence[RefusedRequest], owner: str, claim_until: float
    ) -> None:
        """Insert a message batch still `validating` and claimed by `owner`, who starts it next (`start_batch`
        adds the lines that run). Its refused requests are stored at once as failed lines, counted from the start."""
        async with self.engine.begin() as conn:
            await check_create_quota(conn, batch.tenant_id, batch.created_at)
            row = batch_to_row(batch)
            row.update(total=len(refused), failed=len(refused), claimed_by=owner, claim_expires_at=claim_until)
            await conn.execute(insert(batches).values(**row))
            if refused:
                await conn.execute(
                    insert(requests),
                    [
                        {
                            "batch_id": batch.id,
                            "line_no": request.number,
                            "custom_id": request.custom_id,
                            "body_offset": request.offset,
                            "body_length": 0,
                            "est_prompt_tokens": 0,
                            "state": RequestState.FAILED.value,
                            "attempts": 0,
                            "next_attempt_at": 0.0,
                            "lease_seq": 0,
                            "error_code": REFUSED,
                            "error_message": request.message,
                            "input_tokens": 0,
                            "cached_tokens": 0,
                            "output_tokens": 0,
                            "reasoning_tokens": 0,
                        }
                        for request in refused
                    ],
                )

    async def discard_batch(self, batch_id: str) -> None:
        """Remove a batch that never started, with its lines (its creation was refused after all)."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(requests).where(requests.c.batch_id == batch_id))
            await conn.execute(delete(batches).where(batches.c.id == batch_id))

    async def list_message_batches(
        self,
        tenant_id: str,
        *,
        limit: int,
        before_id: str | None,
        after_id: str | None,
        api: BatchApi = BatchApi.ANTHROPIC,
    ) -> tuple[list[Batch], bool] | None:
        """Newest first: the page just older than `after_id`, or just newer than `before_id`, and whether more
        lie beyond it in that direction. None if the cursor is not one of the tenant's batches of `api`."""
        of_api = batches.c.api == api.value
        query = select(batches).where(batches.c.tenant_id == tenant_id, of_api)
        cursor = before_id or after_id
        async with self.engine.connect() as conn:
            if cursor is not None:
                seq = await conn.scalar(
                    select(batches.c.seq).where(batches.c.id == cursor, batches.c.tenant_id == tenant_id, of_api)
                )
                if seq is None:
                    return None
                query = query.where(batches.c.seq > seq if before_id else batches.c.seq < seq)
            order = batches.c.seq.asc() if before_id else batches.c.seq.desc()
            rows = (await conn.execute(query.order_by(order).limit(limit + 1))).all()
        page = [batch_from_row(row) for row in rows[:limit]]
        if before_id:
            page.reverse()  # read oldest-first to find the nearest newer ones; shown newest first all the same
        return page, len(rows) > limit

    async def unrun_counts(self, batch_ids: Sequence[str]) -> dict[str, UnrunCounts]:
        """Per batch, its lines that ended expired or cancelled without running."""
        if not batch_ids:
            return {}
        query = (
            select(requests.c.batch_id, requests.c.state, func.count())
            .where(
                requests.c.batch_id.in_(batch_ids),
                requests.c.state.in_([RequestState.EXPIRED.value, RequestState.CANCELLED.value]),
            )
            .group_by(requests.c.batch_id, requests.c.state)
        )
        found: dict[str, dict[str, int]] = {}
        async with self.engine.connect() as conn:
            for batch_id, state, count in await conn.execute(query):
                found.setdefault(batch_id, {})[state] = int(count)
        return {
            batch_id: UnrunCounts(
                expired=counts.get(RequestState.EXPIRED.value, 0),
                canceled=counts.get(RequestState.CANCELLED.value, 0),
            )
            for batch_id, counts in found.items()
        }

    async def archive_batch(self, batch_id: str, archived_at: int) -> None:
        """Record that a batch's results are no longer kept (once: an earlier time is never moved)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.archived_at.is_(None))
                .values(archived_at=archived_at)
            )

    async def delete_message_batch(self, tenant_id: str, batch_id: str, api: BatchApi = BatchApi.ANTHROPIC) -> Batch:
        """Remove an ended message batch (or Gemini batch, with `api`) and its lines; its input file is the
        caller's to remove."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(batches)
                    .where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id, batches.c.api == api.value)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(f"No such message batch: {batch_id}")
            batch = batch_from_row(row)
            if not batch.status.is_terminal:
                raise Conflict(
                    f"Message batch {batch_id} cannot be deleted while it is processing: cancel it, and delete it "
                    "once its processing_status is 'ended'."
                )
            await conn.execute(delete(requests).where(requests.c.batch_id == batch_id))
            await conn.execute(delete(batches).where(batches.c.id == batch_id))
        return batch
