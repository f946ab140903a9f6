"""SqlStore: tenants, keys, files and batches on SQLite or PostgreSQL. Line queries are in `store.lines`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import ColumnElement, Select, and_, false, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill import ids
from backfill.domain.batches import (
    CANCELLABLE,
    TERMINAL,
    Batch,
    BatchApi,
    BatchStatus,
    LineError,
    RequestState,
    sources_of,
)
from backfill.domain.files import MESSAGE_BATCH_PURPOSE, FileRecord
from backfill.domain.valid_lines import ValidLine, estimates, rows
from backfill.errors import Conflict, NotFound, TokenLimitExceeded
from backfill.ports import Store
from backfill.store.idempotency import IdempotencyQueries
from backfill.store.lines import IS_OPEN, LineQueries
from backfill.store.message_batches import MessageBatchQueries
from backfill.store.result_cache import ResultCacheQueries
from backfill.store.rows import batch_from_row, batch_to_row, file_from_row
from backfill.store.tables import batches, files, requests, tenants
from backfill.store.tenants import TenantQueries, check_create_quota, check_start_rate, locked_tenant
from backfill.store.usage import UsageQueries
from backfill.store.webhooks import WebhookQueries, add_ended_event
from backfill.store.workers import WorkerQueries

_TERMINAL = [status.value for status in TERMINAL]
_INSERT_CHUNK = 1_000


class SqlStore(
    TenantQueries,
    LineQueries,
    MessageBatchQueries,
    WorkerQueries,
    IdempotencyQueries,
    WebhookQueries,
    UsageQueries,
    ResultCacheQueries,
):
    """Every query backfill runs, by name. Construct with an engine from `store.engine.create_engine`."""

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        """`read_engine`: where batches are read for clients (store.engine.create_read_engine); else `engine`."""
        super().__init__(engine)
        self.read_engine = read_engine

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not None:
            await self.read_engine.dispose()

    # --- tenants and keys -------------------------------------------------------------------------------------

    async def ensure_tenant(self, name: str, now: int, enqueued_token_limit: int | None = None) -> str:
        """The id of the tenant called `name`, created if it does not exist."""
        async with self.engine.begin() as conn:
            found = await conn.scalar(select(tenants.c.id).where(tenants.c.name == name))
            if found is not None:
                return str(found)
            tenant_id = ids.new_id("tenant_", 8)
            try:
                await conn.execute(
                    insert(tenants).values(
                        id=tenant_id,
                        name=name,
                        weight=1.0,
                        enqueued_token_limit=enqueued_token_limit,
                        created_at=now,
                    )
                )
            except IntegrityError:
                pass  # created concurrently; read it below
            else:
                return tenant_id
        async with self.engine.connect() as conn:
            return str(await conn.scalar(select(tenants.c.id).where(tenants.c.name == name)))

    async def tenant_token_limit(self, tenant_id: str) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(tenants.c.enqueued_token_limit).where(tenants.c.id == tenant_id))
            return int(value) if value is not None else None

    # --- files ------------------------------------------------------------------------------------------------

    async def add_file(self, record: FileRecord) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(files).values(**_file_values(record)))

    async def get_file(self, tenant_id: str | None, file_id: str) -> FileRecord | None:
        query = select(files).where(_equals(files.c.id, file_id))
        if tenant_id is not None:
            query = query.where(files.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return file_from_row(row) if row else None

    async def list_files(
        self, tenant_id: str, *, purpose: str | None, limit: int, descending: bool, after: str | None
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None if the `after` cursor is not one of the tenant's."""
        query = select(files).where(files.c.tenant_id == tenant_id, files.c.purpose != MESSAGE_BATCH_PURPOSE)
        if purpose is not None:
            query = query.where(_equals(files.c.purpose, purpose))
        async with self.engine.connect() as conn:
            if after is not None:
                seq = await conn.scalar(
                    select(files.c.seq).where(_equals(files.c.id, after), files.c.tenant_id == tenant_id)
                )
                if seq is None:
                    return None
                query = query.where(files.c.seq < seq if descending else files.c.seq > seq)
            query = query.order_by(files.c.seq.desc() if descending else files.c.seq.asc()).limit(limit + 1)
            rows = (await conn.execute(query)).all()
        return [file_from_row(row) for row in rows[:limit]], len(rows) > limit

    async def delete_file(self, tenant_id: str, file_id: str) -> FileRecord:
        """Remove the file's row; refused (Conflict) while an unfinished batch reads it."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(files).where(_equals(files.c.id, file_id), files.c.tenant_id == tenant_id))
            ).first()
            if row is None:
                raise NotFound(f"No such File object: {file_id}", param="file_id")
            if await conn.scalar(_batches_reading(file_id)):
                raise Conflict(f"File {file_id} is the input of a batch that has not ended; delete it afterwards.")
            await conn.execute(files.delete().where(files.c.id == file_id))
        return file_from_row(row)

    async def expired_files(self, now: int, limit: int = 100) -> list[FileRecord]:
        """Files past `expires_at` that no unfinished batch reads."""
        reading = select(batches.c.input_file_id).where(batches.c.status.not_in(_TERMINAL))
        query = (
            select(files)
            .where(files.c.expires_at.is_not(None), files.c.expires_at <= now, files.c.id.not_in(reading))
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [file_from_row(row) for row in await conn.execute(query)]

    # --- batches ----------------------------------------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> None:
        """Insert the batch; QuotaExceeded if it would take its tenant over a create quota."""
        async with self.engine.begin() as conn:
            await check_create_quota(conn, batch.tenant_id, batch.created_at)
            await conn.execute(insert(batches).values(**batch_to_row(batch)))

    async def get_batch(self, tenant_id: str | None, batch_id: str, api: BatchApi | None = None) -> Batch | None:
        """The batch; with `api`, only if it was created through that API (each API shows only its own)."""
        query = select(batches).where(_equals(batches.c.id, batch_id))
        if tenant_id is not None:
            query = query.where(batches.c.tenant_id == tenant_id)
        if api is not None:
            query = query.where(batches.c.api == api.value)
        async with (self.read_engine or self.engine).connect() as conn:
            row = (await conn.execute(query)).first()
        return batch_from_row(row) if row else None

    async def list_batches(self, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool] | None:
        """Newest first, OpenAI batches only; None if `after` is not one of the tenant's batches."""
        openai = batches.c.api == BatchApi.OPENAI.value
        query = select(batches).where(batches.c.tenant_id == tenant_id, openai)
        async with (self.read_engine or self.engine).connect() as conn:
            if after is not None:
                seq = await conn.scalar(
                    select(batches.c.seq).where(_equals(batches.c.id, after), batches.c.tenant_id == tenant_id, openai)
                )
                if seq is None:
                    return None
                query = query.where(batches.c.seq < seq)
            rows = (await conn.execute(query.order_by(batches.c.seq.desc()).limit(limit + 1))).all()
        return [batch_from_row(row) for row in rows[:limit]], len(rows) > limit

    async def request_cancel(self, tenant_id: str, batch_id: str, now: int, api: BatchApi | None = None) -> Batch:
        async with self.engine.begin() as conn:
            # Locked: otherwise validation can move the batch on between this read and the update below, and the
            # cancel is silently lost (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises).
            mine = [_equals(batches.c.id, batch_id), batches.c.tenant_id == tenant_id]
            if api is not None:
                mine.append(batches.c.api == api.value)
            status = await conn.scalar(select(batches.c.status).where(*mine).with_for_update())
            if status is None:
                raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
            if status not in CANCELLABLE and status != BatchStatus.CANCELLING:
                raise Conflict(f"Cannot cancel a batch with status '{status}'.")
            if status != BatchStatus.CANCELLING:
                await conn.execute(
                    update(batches)
                    .where(batches.c.id == batch_id, batches.c.status == status)
                    .values(status=BatchStatus.CANCELLING.value, cancelling_at=now)
                )
        batch = await self.get_batch(tenant_id, batch_id)
        assert batch is not None
        return batch

    async def batches_to_tend(self, now: float, limit: int = 50) -> list[Batch]:
        """Batches with housekeeping due: validation, cancel, expiry or finalize, not claimed by a live worker."""
        due = or_(
            batches.c.status.in_(
                [BatchStatus.VALIDATING.value, BatchStatus.CANCELLING.value, BatchStatus.FINALIZING.value]
            ),
            and_(
                batches.c.status == BatchStatus.IN_PROGRESS.value,
                or_(batches.c.expires_at <= now, batches.c.completed + batches.c.failed >= batches.c.total),
            ),
        )
        unclaimed = or_(batches.c.claimed_by.is_(None), batches.c.claim_expires_at < now)
        query = select(batches).where(due, unclaimed).order_by(batches.c.seq).limit(limit)
        async with self.engine.connect() as conn:
            return [batch_from_row(row) for row in await conn.execute(query)]

    async def claim_batch(self, batch_id: str, owner: str, now: float, ttl_s: float) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    or_(
                        batches.c.claimed_by.is_(None),
                        batches.c.claim_expires_at < now,
                        batches.c.claimed_by == owner,
                    ),
                )
                .values(claimed_by=owner, claim_expires_at=now + ttl_s)
            )
            return result.rowcount == 1

    async def release_batch(self, batch_id: str, owner: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.claimed_by == owner)
                .values(claimed_by=None, claim_expires_at=None)
            )

    async def start_batch(
        self,
        batch_id: str,
        owner: str,
        model: str | None,
        lines: Sequence[ValidLine],
        now: int,
        *,
        token_limit: int | None = None,
    ) -> bool:
        """validating -> in_progress with all its lines, in one transaction; False if the batch moved on.

        With a `token_limit`, the tenant's enqueued tokens for the model are checked in the same transaction,
        under a lock on the tenant row, so two batches validated at once cannot both slip under the limit;
        over it, raises TokenLimitExceeded and changes nothing. So is the tenant's batch tokens per minute
        (TokenRateExceeded).
        """
        est, est_output = await asyncio.to_thread(estimates, lines)  # a list of 100,000: not on the loop
        async with self.engine.begin() as conn:
            tenant_id, rate_limit = (
                await conn.execute(
                    select(batches.c.tenant_id, tenants.c.batch_tokens_per_minute)
                    .select_from(batches.join(tenants, tenants.c.id == batches.c.tenant_id))
                    .where(batches.c.id == batch_id)
                )
            ).first() or (None, None)
            limited = (token_limit is not None and model is not None) or rate_limit is not None
            # Locked only when limited: the lock serialises the validations of one tenant's batches.
            if limited and (tenant := await locked_tenant(conn, str(tenant_id))) is not None:
                if token_limit is not None and model is not None:
                    enqueued = int(await conn.scalar(_enqueued_tokens_query(tenant.id, model)) or 0)
                    if enqueued + est > token_limit:
                        raise TokenLimitExceeded(enqueued=enqueued, wanted=est, limit=token_limit)
                await check_start_rate(conn, tenant, est, now)
            result = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status == BatchStatus.VALIDATING.value,
                    batches.c.claimed_by == owner,
                )
                .values(
                    status=BatchStatus.IN_PROGRESS.value,
                    in_progress_at=now,
                    model=model,
                    total=batches.c.total + len(lines),  # a message batch already counts its refused requests
                    est_prompt_tokens=est,
                    est_output_tokens=est_output,
                )
            )
            if result.rowcount != 1:
                return False
            await _insert_lines(conn, batch_id, lines)
        return True

    async def fail_batch(self, batch_id: str, owner: str, model: str | None, errors: list[LineError], now: int) -> bool:
        """validating -> failed with line-numbered errors."""
        payload = orjson.dumps([error.to_dict() for error in errors]).decode()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status == BatchStatus.VALIDATING.value,
                    batches.c.claimed_by == owner,
                )
                .values(status=BatchStatus.FAILED.value, failed_at=now, errors=payload, model=model)
            )
            if result.rowcount != 1:
                return False
            await add_ended_event(conn, batch_id, BatchStatus.FAILED, now)
            return True

    async def mark_finalizing(self, batch_id: str, owner: str, now: int) -> bool:
        """in_progress -> finalizing; False if the batch moved on (cancelled meanwhile, say)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status == BatchStatus.IN_PROGRESS.value,
                    batches.c.claimed_by == owner,
                )
                .values(status=BatchStatus.FINALIZING.value, finalizing_at=now)
            )
            return result.rowcount == 1

    async def finish_batch(
        self,
        batch_id: str,
        owner: str,
        status: BatchStatus,
        outputs: Sequence[FileRecord | None],
        now: int,
    ) -> bool:
        """Register the output and error files and set the terminal status, in one transaction; only from a status
        that may legally move to it (a batch cancelled while its files were written is not marked completed)."""
        output, error = outputs
        values: dict[str, Any] = {
            "status": status.value,
            f"{status.value}_at": now,
            "output_file_id": output.id if output else None,
            "error_file_id": error.id if error else None,
            "claimed_by": None,
            "claim_expires_at": None,
        }
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.status.in_([old.value for old in sources_of(status)]),
                    batches.c.claimed_by == owner,
                )
                .values(**values)
            )
            if result.rowcount != 1:
                return False
            await add_ended_event(conn, batch_id, status, now)
            for record in (output, error):
                if record is not None:
                    await conn.execute(insert(files).values(**_file_values(record)))
        return True

    async def enqueued_tokens(self, tenant_id: str, model: str) -> int:
        """Estimated prompt tokens of the tenant's unfinished lines for `model` (SPEC §3 quota)."""
        async with self.engine.connect() as conn:
            return int(await conn.scalar(_enqueued_tokens_query(tenant_id, model)) or 0)


def _equals(column: ColumnElement[str], value: str) -> ColumnElement[bool]:
    """`column == value` for a value from a client. PostgreSQL text cannot hold NUL, so no stored key contains
    one (and the driver refuses to send it): such a value matches nothing, on every database alike."""
    return false() if "\x00" in value else column == value


def _batches_reading(file_id: str) -> Select[tuple[bool]]:
    return select(
        select(batches.c.seq).where(batches.c.input_file_id == file_id, batches.c.status.not_in(_TERMINAL)).exists()
    )


def _enqueued_tokens_query(tenant_id: str, model: str) -> Select[tuple[int]]:
    return (
        select(func.coalesce(func.sum(requests.c.est_prompt_tokens), 0))
        .select_from(requests.join(batches, requests.c.batch_id == batches.c.id))
        .where(
            batches.c.tenant_id == tenant_id,
            batches.c.model == model,
            IS_OPEN,
        )
    )


def _file_values(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant_id": record.tenant_id,
        "filename": record.filename,
        "purpose": record.purpose,
        "bytes": record.bytes,
        "blob_key": record.blob_key,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }


# A new line's columns: the batch's and the validator's `rows`, then those every queued line starts with.
_LINE_COLUMNS = (
    "batch_id, line_no, custom_id, body_offset, body_length, est_prompt_tokens, max_output_tokens, prefix_group,"
    " state, attempts, next_attempt_at, lease_seq, input_tokens, cached_tokens, output_tokens, reasoning_tokens"
)
_QUEUED_LINE = (RequestState.QUEUED.value, 0, 0.0, 0, 0, 0, 0, 0)  # state, attempts, ... reasoning_tokens
# SQLite: through the driver's executemany with one tuple a line (SQLAlchemy's compiled insert built a parameter
# dict per row, about half of validating a batch: BENCHMARKS.md, "Ingest").
_INSERT_LINE_SQL = (
    f"INSERT INTO requests ({_LINE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
    f" {', '.join(repr(value) for value in _QUEUED_LINE)})"
)
# PostgreSQL takes the lines as one COPY: an INSERT a row, even pipelined by the driver's executemany, cost its
# server ~30 µs a line (BENCHMARKS.md, "Fewer index entries a line").
_COPY_LINES_SQL = f"COPY requests ({_LINE_COLUMNS}) FROM STDIN"


async def _insert_lines(conn: AsyncConnection, batch_id: str, lines: Sequence[ValidLine]) -> None:
    if conn.dialect.name == "postgresql":
        await _copy_lines(conn, batch_id, lines)
        return
    for start in range(0, len(lines), _INSERT_CHUNK):
        # Straight from the validator's columns: no `ValidLine` built per line.
        chunk = [(batch_id, *row) for row in rows(lines, start, start + _INSERT_CHUNK)]
        await conn.exec_driver_sql(_INSERT_LINE_SQL, chunk)


async def _copy_lines(conn: AsyncConnection, batch_id: str, lines: Sequence[ValidLine]) -> None:
    """The lines in one COPY, on the driver's connection, inside the transaction `conn` is in."""
    raw = await conn.get_raw_connection()
    driver: AsyncPgConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    async with driver.cursor() as cursor, cursor.copy(_COPY_LINES_SQL) as copy:
        for start in range(0, len(lines), _INSERT_CHUNK):
            for row in rows(lines, start, start + _INSERT_CHUNK):
                await copy.write_row((batch_id, *row, *_QUEUED_LINE))


if TYPE_CHECKING:
    from psycopg import AsyncConnection as AsyncPgConnection  # a SQLite deployment never imports the driver

    _satisfies_the_port: type[Store] = SqlStore  # mypy checks every method's signature against the port
