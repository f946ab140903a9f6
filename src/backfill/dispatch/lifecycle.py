"""One batch's housekeeping: validate, expire, cancel, finalize. Each step is claimed so it runs once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from backfill import ids
from backfill.domain.batches import Batch, BatchApi, BatchStatus, LineError, RequestState, output_file_id_of
from backfill.domain.files import OUTPUT_PURPOSE, FileRecord
from backfill.domain.lines import FileValidator, ValidationLimits, ValidationResult, missing_input_file, split_lines
from backfill.domain.results import output_line
from backfill.errors import BlobStoreUnavailable, TokenLimitExceeded
from backfill.metrics import Metrics
from backfill.ports import BlobStore, WorkerStore

log = structlog.get_logger(__name__)


@dataclass
class Lifecycle:
    store: WorkerStore
    blobs: BlobStore
    limits: ValidationLimits
    is_served: Callable[[str], bool]
    owner: str
    default_token_limit: int | None = None
    metrics: Metrics | None = None
    # Where the file is read and checked line by line (blocking work): a worker thread; tests may run it inline.
    run_blocking: Callable[[Callable[[str, str], ValidationResult], str, str], Awaitable[ValidationResult]] = (
        asyncio.to_thread
    )
    # What a batch of a model waits for, as this worker's dispatcher sees it (None: a backend is up).
    waiting_for: Callable[[str], str | None] = lambda model: None
    # A batch just became dispatchable: this worker's dispatcher looks now rather than at its next poll.
    started: Callable[[], None] = lambda: None
    # Batches said to be closing: the step runs at every poll while lines are in flight, the log line once.
    _closing: set[str] = field(default_factory=set)

    async def tend(self, batch: Batch, now: float) -> None:
        """Move `batch` along if something is due; safe to call again at any time."""
        if batch.status is BatchStatus.VALIDATING:
            if now >= batch.expires_at:
                await self.finalize(batch, BatchStatus.EXPIRED, now)
            else:
                await self.validate(batch, now)
        elif batch.status is BatchStatus.CANCELLING:
            await self.close_and_finalize(batch, RequestState.CANCELLED, BatchStatus.CANCELLED, now)
        elif batch.status is BatchStatus.IN_PROGRESS and now >= batch.expires_at:
            await self.close_and_finalize(batch, RequestState.EXPIRED, BatchStatus.EXPIRED, now)
        elif batch.status is BatchStatus.IN_PROGRESS and batch.completed + batch.failed >= batch.total:
            if await self.store.mark_finalizing(batch.id, self.owner, int(now)):
                await self.finalize(batch, BatchStatus.COMPLETED, now)
        elif batch.status is BatchStatus.FINALIZING:
            await self.finalize(batch, BatchStatus.COMPLETED, now)

    async def validate(self, batch: Batch, now: float) -> None:
        record = await self.store.get_file(batch.tenant_id, batch.input_file_id)
        if record is None:  # unknown, deleted, or another tenant's: the same answer (SPEC §3)
            await self._fail(batch, None, [missing_input_file(batch.input_file_id)], now)
            return
        try:
            result = await self.run_blocking(self._validate_blob, batch.endpoint, record.blob_key)
        except BlobStoreUnavailable as exc:
            # The bytes are there, the store is not (an S3 outage): stay `validating`, the next tend tries again.
            log.warning("batch.input_unavailable", batch_id=batch.id, error=str(exc))
            return
        except OSError as exc:
            log.exception("batch.input_unreadable", batch_id=batch.id)
            error = LineError("invalid_request", f"The input file {batch.input_file_id} could not be read: {exc}.")
            await self._fail(batch, None, [error], now)
            return
        if not result.ok:
            await self._fail(batch, result.model, result.errors, now)
            log.info("batch.failed_validation", batch_id=batch.id, errors=result.error_count)
            return
        try:
            started = await self.store.start_batch(
                batch.id, self.owner, result.model, result.lines, int(now), token_limit=await self._limit(batch)
            )
        except TokenLimitExceeded as exc:
            await self._fail(batch, result.model, [LineError("token_limit_exceeded", f"{result.model}: {exc}")], now)
            return
        log.info("batch.validated", batch_id=batch.id, lines=len(result.lines), started=started)
        if started:
            self.started()

    async def _fail(self, batch: Batch, model: str | None, errors: list[LineError], now: float) -> None:
        if await self.store.fail_batch(batch.id, self.owner, model, errors, int(now)) and self.metrics:
            self.metrics.batches_finished.labels(BatchStatus.FAILED.value).inc()
            await self._observe_sla(batch, BatchStatus.FAILED, now)

    async def _limit(self, batch: Batch) -> int | None:
        limit = await self.store.tenant_token_limit(batch.tenant_id)
        return limit if limit is not None else self.default_token_limit

    def _validate_blob(self, endpoint: str, blob_key: str) -> ValidationResult:
        validator = FileValidator(endpoint, self.is_served, self.limits)
        for raw in split_lines(self.blobs.iter_chunks(blob_key), self.limits.max_line_bytes):
            validator.feed(raw)
        return validator.finish()

    async def close_and_finalize(
        self, batch: Batch, line_state: RequestState, terminal: BatchStatus, now: float
    ) -> None:
        """Queued lines end as `line_state`; once no line is in flight anywhere, write the files."""
        # Lines that waited for a backend to come back end with why it did not.
        note = None
        if line_state is RequestState.EXPIRED:
            note = batch.waiting if batch.is_waiting else self.waiting_for(batch.model or "")
        closed = await self.store.close_queued_lines(batch.id, line_state, note)
        fresh = await self.store.get_batch(None, batch.id)
        if fresh is None or fresh.completed + fresh.failed < fresh.total:
            if closed or batch.id not in self._closing:
                log.info("batch.closing", batch_id=batch.id, closed=closed, waiting_for_in_flight=True)
                self._closing.add(batch.id)
            return
        self._closing.discard(batch.id)
        if terminal is BatchStatus.EXPIRED and not (await self.store.line_state_counts(batch.id)).get("expired"):
            # Every line ended before the window closed: that is a completed batch.
            if not await self.store.mark_finalizing(batch.id, self.owner, int(now)):
                return
            terminal = BatchStatus.COMPLETED
        await self.finalize(fresh, terminal, now)

    async def finalize(self, batch: Batch, terminal: BatchStatus, now: float) -> None:
        """Stream every line, in input order, into the output and error files; then the terminal status."""
        # A message batch's results are read from its lines when asked for (GET …/results): no files to write.
        records = await self._write_files(batch, now) if batch.api is BatchApi.OPENAI else [None, None]
        done = await self.store.finish_batch(batch.id, self.owner, terminal, records, int(now))
        if done and self.metrics is not None:
            self.metrics.batches_finished.labels(terminal.value).inc()
            await self._observe_sla(batch, terminal, now)
        log.info("batch.finished", batch_id=batch.id, status=terminal.value, registered=done)

    async def _observe_sla(self, batch: Batch, terminal: BatchStatus, now: float) -> None:
        """The batch's outcome against its window, in the SLA metrics (the usage API reads the same from the store)."""
        if self.metrics is None:
            return
        tenant = await self.store.get_tenant(batch.tenant_id)
        labels = (tenant.name if tenant is not None else batch.tenant_id, batch.completion_window)
        outcome = terminal.value
        if terminal is BatchStatus.COMPLETED:
            outcome = "in_window" if now <= batch.expires_at else "late"
            self.metrics.batch_turnaround_seconds.labels(*labels).observe(max(0.0, now - batch.created_at))
        elif terminal is BatchStatus.EXPIRED:
            expired = (await self.store.line_state_counts(batch.id)).get(RequestState.EXPIRED.value, 0)
            self.metrics.batch_lines_expired.labels(*labels).inc(expired)
        self.metrics.batch_sla.labels(*labels, outcome).inc()

    async def _write_files(self, batch: Batch, now: float) -> list[FileRecord | None]:
        keys = (f"outputs/{batch.id}/output.jsonl", f"outputs/{batch.id}/error.jsonl")
        writers = (self.blobs.open_writer(keys[0]), self.blobs.open_writer(keys[1]))
        try:
            async for result in self.store.iter_results(batch.id):
                fallback_id = "" if result.result_id else ids.batch_request_id()  # 32 random hex digits cost
                writers[0 if result.is_success else 1].write(output_line(result, fallback_id))
        except BaseException:
            for writer in writers:
                await writer.abort()
            raise
        expires_at = int(now) + batch.output_expires_after_s if batch.output_expires_after_s else None
        records: list[FileRecord | None] = []
        for kind, key, writer in zip(("output", "error"), keys, writers, strict=True):
            if writer.size == 0:
                await writer.abort()
                records.append(None)
                continue
            await writer.commit()
            records.append(
                FileRecord(
                    # The output's id was known from the start (partial reads while the batch ran).
                    id=output_file_id_of(batch.id) if kind == "output" else ids.file_id(),
                    tenant_id=batch.tenant_id,
                    filename=f"{batch.id}_{kind}.jsonl",
                    purpose=OUTPUT_PURPOSE,
                    bytes=writer.size,
                    blob_key=key,
                    created_at=int(now),
                    expires_at=expires_at,
                )
            )
        return records
