"""InMemoryStore: the Store port in plain Python, for tests and anything else that needs a store but no database.
It behaves as SqlStore does, down to leases fenced on (owner, lease_seq), counters kept in step with the lines and
tenant isolation; the contract suite (tests/integration/test_store_*.py) runs on both. Time is an argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from backfill.domain.batches import (
    CANCELLABLE,
    OPEN_STATES,
    TERMINAL,
    Batch,
    BatchApi,
    BatchStatus,
    LineError,
    RequestState,
    sources_of,
)
from backfill.domain.files import MESSAGE_BATCH_PURPOSE, FileRecord
from backfill.domain.message_batches import REFUSED, RefusedRequest, UnrunCounts
from backfill.domain.valid_lines import ValidLine, estimates
from backfill.errors import Conflict, NotFound, TokenLimitExceeded
from backfill.ports import Store
from backfill.testing.memory_idempotency import MemoryIdempotency
from backfill.testing.memory_lines import MemoryLineQueue
from backfill.testing.memory_tables import (
    BatchRow,
    ConstraintViolation,
    MemoryTables,
    StoredLine,
    copy_batch,
    page,
)
from backfill.testing.memory_tenants import MemoryTenants
from backfill.testing.memory_usage import MemoryUsage
from backfill.testing.memory_webhooks import MemoryWebhooks
from backfill.testing.memory_workers import MemoryWorkerBoard


class InMemoryStore(MemoryWebhooks, MemoryTenants, MemoryLineQueue, MemoryWorkerBoard, MemoryIdempotency, MemoryUsage):
    """Everything backfill keeps, in dictionaries. One instance is one database; nothing is shared between two."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = MemoryTables()

    async def close(self) -> None:
        pass

    # --- tenants and keys -------------------------------------------------------------------------------------

    # --- files ------------------------------------------------------------------------------------------------

    async def add_file(self, record: FileRecord) -> None:
        self.tables.insert_files([record])

    async def get_file(self, tenant_id: str | None, file_id: str) -> FileRecord | None:
        row = self.tables.files.get(file_id)
        if row is None or tenant_id not in (None, row.record.tenant_id):
            return None
        return row.record

    async def list_files(
        self, tenant_id: str, *, purpose: str | None, limit: int, descending: bool, after: str | None
    ) -> tuple[list[FileRecord], bool] | None:
        rows = [
            row
            for row in self.tables.files.values()
            if row.record.tenant_id == tenant_id
            and row.record.purpose != MESSAGE_BATCH_PURPOSE
            and purpose in (None, row.record.purpose)
        ]
        if after is not None:
            cursor = self.tables.files.get(after)
            if cursor is None or cursor.record.tenant_id != tenant_id:
                return None
            rows = [row for row in rows if (row.seq < cursor.seq if descending else row.seq > cursor.seq)]
        found, more = page(rows, limit, lambda row: row.seq, descending=descending)
        return [row.record for row in found], more

    async def delete_file(self, tenant_id: str, file_id: str) -> FileRecord:
        row = self.tables.files.get(file_id)
        if row is None or row.record.tenant_id != tenant_id:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        if file_id in self._files_being_read():
            raise Conflict(f"File {file_id} is the input of a batch that has not ended; delete it afterwards.")
        del self.tables.files[file_id]
        return row.record

    async def expired_files(self, now: int, limit: int = 100) -> list[FileRecord]:
        reading = self._files_being_read()
        expired = [
            row.record
            for row in sorted(self.tables.files.values(), key=lambda row: row.seq)
            if row.record.expires_at is not None and row.record.expires_at <= now and row.record.id not in reading
        ]
        return expired[: max(limit, 0)]

    def _files_being_read(self) -> set[str]:
        return {row.batch.input_file_id for row in self.tables.batches.values() if row.batch.status not in TERMINAL}

    # --- batches ----------------------------------------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> None:
        self.check_create_quota(batch.tenant_id, batch.created_at)
        self.tables.insert_batch(_as_created(batch))

    async def get_batch(self, tenant_id: str | None, batch_id: str, api: BatchApi | None = None) -> Batch | None:
        row = self._batch_row(tenant_id, batch_id, api)
        return copy_batch(row.batch) if row is not None else None

    async def list_batches(self, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool] | None:
        rows = self._batch_rows(tenant_id, BatchApi.OPENAI)
        if after is not None:
            cursor = self._batch_row(tenant_id, after, BatchApi.OPENAI)
            if cursor is None:
                return None
            rows = [row for row in rows if row.seq < cursor.seq]
        found, more = page(rows, limit, lambda row: row.seq, descending=True)
        return [copy_batch(row.batch) for row in found], more

    async def request_cancel(self, tenant_id: str, batch_id: str, now: int, api: BatchApi | None = None) -> Batch:
        row = self._batch_row(tenant_id, batch_id, api)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        status = row.batch.status
        if status not in CANCELLABLE and status != BatchStatus.CANCELLING:
            raise Conflict(f"Cannot cancel a batch with status '{status}'.")
        if status != BatchStatus.CANCELLING:
            row.batch.status, row.batch.cancelling_at = BatchStatus.CANCELLING, now
        return copy_batch(row.batch)

    async def batches_to_tend(self, now: float, limit: int = 50) -> list[Batch]:
        housekeeping = {BatchStatus.VALIDATING, BatchStatus.CANCELLING, BatchStatus.FINALIZING}

        def is_due(batch: Batch) -> bool:
            if batch.status in housekeeping:
                return True
            ended = batch.expires_at <= now or batch.completed + batch.failed >= batch.total
            return batch.status == BatchStatus.IN_PROGRESS and ended

        def is_unclaimed(row: BatchRow) -> bool:
            return row.claimed_by is None or (row.claim_expires_at is not None and row.claim_expires_at < now)

        due = [row for row in self._by_seq() if is_due(row.batch) and is_unclaimed(row)]
        return [copy_batch(row.batch) for row in due[: max(limit, 0)]]

    async def claim_batch(self, batch_id: str, owner: str, now: float, ttl_s: float) -> bool:
        row = self.tables.batches.get(batch_id)
        if row is None or not row.is_claimable_by(owner, now):
            return False
        row.claimed_by, row.claim_expires_at = owner, now + ttl_s
        return True

    async def release_batch(self, batch_id: str, owner: str) -> None:
        row = self.tables.batches.get(batch_id)
        if row is not None and row.claimed_by == owner:
            row.claimed_by, row.claim_expires_at = None, None

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
        est, est_output = estimates(lines)
        row = self.tables.batches.get(batch_id)
        # As SqlStore: the limit is checked before the batch's status, so over it raises even if it moved on.
        if token_limit is not None and model is not None:
            enqueued = self._enqueued_tokens(row.batch.tenant_id, model) if row is not None else 0
            if enqueued + est > token_limit:
                raise TokenLimitExceeded(enqueued=enqueued, wanted=est, limit=token_limit)
        if row is not None:
            self.check_start_rate(row.batch.tenant_id, est, now)
        if row is None or row.batch.status != BatchStatus.VALIDATING or row.claimed_by != owner:
            return False
        self.tables.insert_lines([_queued(batch_id, line) for line in lines])
        batch = row.batch
        batch.status, batch.in_progress_at, batch.model = BatchStatus.IN_PROGRESS, now, model
        batch.total += len(lines)  # a message batch already counts its refused requests
        row.est_prompt_tokens = est
        row.est_output_tokens = est_output
        return True

    async def fail_batch(self, batch_id: str, owner: str, model: str | None, errors: list[LineError], now: int) -> bool:
        row = self._claimed(batch_id, owner, BatchStatus.VALIDATING)
        if row is None:
            return False
        batch = row.batch
        batch.status, batch.failed_at, batch.errors, batch.model = BatchStatus.FAILED, now, list(errors), model
        self.queue_ended_event(batch, BatchStatus.FAILED, now)
        return True

    async def mark_finalizing(self, batch_id: str, owner: str, now: int) -> bool:
        row = self._claimed(batch_id, owner, BatchStatus.IN_PROGRESS)
        if row is None:
            return False
        row.batch.status, row.batch.finalizing_at = BatchStatus.FINALIZING, now
        return True

    async def finish_batch(
        self, batch_id: str, owner: str, status: BatchStatus, outputs: Sequence[FileRecord | None], now: int
    ) -> bool:
        output, error = outputs
        row = self.tables.batches.get(batch_id)
        if row is None or row.batch.status not in sources_of(status) or row.claimed_by != owner:
            return False
        self.tables.insert_files([record for record in (output, error) if record is not None])
        batch = row.batch
        batch.status = status
        setattr(batch, f"{status.value}_at", now)
        batch.output_file_id = output.id if output else None
        batch.error_file_id = error.id if error else None
        row.claimed_by, row.claim_expires_at = None, None
        self.queue_ended_event(batch, status, now)
        return True

    async def enqueued_tokens(self, tenant_id: str, model: str) -> int:
        return self._enqueued_tokens(tenant_id, model)

    def _enqueued_tokens(self, tenant_id: str, model: str) -> int:
        return sum(
            line.est_prompt_tokens
            for row in self.tables.batches.values()
            if row.batch.tenant_id == tenant_id and row.batch.model == model
            for line in self.tables.lines_in(row.batch.id)
            if line.state in OPEN_STATES
        )

    def _batch_row(self, tenant_id: str | None, batch_id: str, api: BatchApi | None) -> BatchRow | None:
        """The batch if it is the tenant's (any tenant's: None) and, with `api`, created through that API."""
        row = self.tables.batches.get(batch_id)
        if row is None or tenant_id not in (None, row.batch.tenant_id) or api not in (None, row.batch.api):
            return None
        return row

    def _batch_rows(self, tenant_id: str, api: BatchApi) -> list[BatchRow]:
        return [row for row in self.tables.batches.values() if (row.batch.tenant_id, row.batch.api) == (tenant_id, api)]

    def _claimed(self, batch_id: str, owner: str, status: BatchStatus) -> BatchRow | None:
        """The batch if it is in `status` and `owner` holds its claim."""
        row = self.tables.batches.get(batch_id)
        return row if row is not None and row.batch.status == status and row.claimed_by == owner else None

    def _by_seq(self) -> list[BatchRow]:
        return sorted(self.tables.batches.values(), key=lambda row: row.seq)

    # --- message batches ---------------------------------------------------------------------------------------

    async def add_message_batch(
        self, batch: Batch, refused: Sequence[RefusedRequest], owner: str, claim_until: float
    ) -> None:
        self.check_create_quota(batch.tenant_id, batch.created_at)
        stored = _as_created(batch)
        stored.total = stored.failed = len(refused)
        row = self.tables.insert_batch(stored)
        row.claimed_by, row.claim_expires_at = owner, claim_until
        refused_lines = [
            StoredLine(
                id=0,
                batch_id=batch.id,
                line_no=request.number,
                custom_id=request.custom_id,
                offset=request.offset,
                length=0,
                est_prompt_tokens=0,
                state=RequestState.FAILED,
                error_code=REFUSED,
                error_message=request.message,
            )
            for request in refused
        ]
        try:
            self.tables.insert_lines(refused_lines)
        except ConstraintViolation:
            self.tables.delete_batch(batch.id)  # all or nothing, as SqlStore's transaction
            raise

    async def discard_batch(self, batch_id: str) -> None:
        self.tables.delete_batch(batch_id)

    async def list_message_batches(
        self,
        tenant_id: str,
        *,
        limit: int,
        before_id: str | None,
        after_id: str | None,
        api: BatchApi = BatchApi.ANTHROPIC,
    ) -> tuple[list[Batch], bool] | None:
        rows = self._batch_rows(tenant_id, api)
        cursor_id = before_id or after_id
        if cursor_id is not None:
            cursor = self._batch_row(tenant_id, cursor_id, api)
            if cursor is None:
                return None
            rows = [row for row in rows if (row.seq > cursor.seq if before_id else row.seq < cursor.seq)]
        # Read oldest-first to find the nearest newer ones (`before_id`); shown newest first all the same.
        found, more = page(rows, limit, lambda row: row.seq, descending=not before_id)
        if before_id:
            found.reverse()
        return [copy_batch(row.batch) for row in found], more

    async def unrun_counts(self, batch_ids: Sequence[str]) -> dict[str, UnrunCounts]:
        found = {}
        for batch_id in batch_ids:
            states = [line.state for line in self.tables.lines_in(batch_id)]
            expired, cancelled = states.count(RequestState.EXPIRED), states.count(RequestState.CANCELLED)
            if expired or cancelled:
                found[batch_id] = UnrunCounts(expired=expired, canceled=cancelled)
        return found

    async def archive_batch(self, batch_id: str, archived_at: int) -> None:
        row = self.tables.batches.get(batch_id)
        if row is not None and row.batch.archived_at is None:
            row.batch.archived_at = archived_at

    async def delete_message_batch(self, tenant_id: str, batch_id: str, api: BatchApi = BatchApi.ANTHROPIC) -> Batch:
        row = self._batch_row(tenant_id, batch_id, api)
        if row is None:
            raise NotFound(f"No such message batch: {batch_id}")
        if not row.batch.status.is_terminal:
            raise Conflict(
                f"Message batch {batch_id} cannot be deleted while it is processing: cancel it, and delete it "
                "once its processing_status is 'ended'."
            )
        self.tables.delete_batch(batch_id)
        return copy_batch(row.batch)


def _as_created(batch: Batch) -> Batch:
    """What `create_batch` keeps of a new batch: SqlStore's row starts with no counters, errors, files or times."""
    return copy_batch(
        Batch(
            id=batch.id,
            tenant_id=batch.tenant_id,
            endpoint=batch.endpoint,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            created_at=batch.created_at,
            expires_at=batch.expires_at,
            metadata=batch.metadata,
            model=batch.model,
            output_expires_after_s=batch.output_expires_after_s,
            api=batch.api,
        )
    )


def _queued(batch_id: str, line: ValidLine) -> StoredLine:
    return StoredLine(
        id=0,  # given by insert_lines
        batch_id=batch_id,
        line_no=line.number,
        custom_id=line.custom_id,
        offset=line.offset,
        length=line.length,
        est_prompt_tokens=line.est_prompt_tokens,
        state=RequestState.QUEUED,
        max_output_tokens=line.max_output_tokens,
        prefix_group=line.prefix_group,
    )


if TYPE_CHECKING:
    _satisfies_the_port: type[Store] = InMemoryStore  # mypy checks every method's signature against the port
