"""InMemoryStore's line queue: leases fenced on (owner, lease_seq), group commit, renew, reclaim, results in order."""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.result_cache import CachedResult, metadata_flag
from backfill.domain.results import StoredResult
from backfill.domain.usage_report import UsageCounts, UsageKey, kind_of_api, row_start
from backfill.testing.memory_tables import MemoryTables, StoredLine


class MemoryLineQueue:
    """Each method runs without awaiting, so it is one transaction, as SqlStore's are."""

    tables: MemoryTables

    def lines(self, batch_id: str) -> list[StoredLine]:
        """The batch's lines as stored, in line-number order: for tests that look behind the port."""
        return self.tables.lines_in(batch_id)

    async def dispatchable_batches(self, now: float) -> list[DispatchBatch]:
        found = []
        for row in self.tables.batches.values():
            batch = row.batch
            if batch.status != BatchStatus.IN_PROGRESS or batch.expires_at <= now:
                continue
            if batch.completed + batch.failed >= batch.total:
                continue
            file, tenant = self.tables.files.get(batch.input_file_id), self.tables.tenants.get(batch.tenant_id)
            if file is None or tenant is None:  # SqlStore joins both
                continue
            found.append(
                DispatchBatch(
                    id=batch.id,
                    tenant_id=batch.tenant_id,
                    model=batch.model or "",  # set when it started (None only when no line runs: never open)
                    endpoint=batch.endpoint,
                    expires_at=batch.expires_at,
                    input_blob_key=file.record.blob_key,
                    created_at=batch.created_at,
                    seq=row.seq,
                    weight=tenant.weight,
                    open_lines=batch.total - batch.completed - batch.failed,
                    est_prompt_tokens=row.est_prompt_tokens,
                    est_output_tokens=row.est_output_tokens,
                    total=batch.total,
                    result_cache=metadata_flag(batch.metadata),
                )
            )
        return sorted(found, key=lambda dispatchable: (dispatchable.expires_at, dispatchable.seq))

    async def set_outlooks(
        self, outlooks: Sequence[tuple[str, int | None, str | None]], waiting: Mapping[str, str] | None = None
    ) -> None:
        for batch_id, eta, state in outlooks:
            row = self.tables.batches.get(batch_id)
            if row is not None and row.batch.status == BatchStatus.IN_PROGRESS:
                row.batch.eta_at, row.batch.schedule_state = eta, state
                row.batch.waiting = (waiting or {}).get(batch_id)

    async def batch_statuses(self, batch_ids: Sequence[str]) -> dict[str, tuple[BatchStatus, int]]:
        rows = (self.tables.batches.get(batch_id) for batch_id in batch_ids)
        return {row.batch.id: (row.batch.status, row.batch.expires_at) for row in rows if row is not None}

    async def lease_lines(self, batch_id: str, owner: str, limit: int, now: float, ttl_s: float) -> list[LeasedLine]:
        lines = (self.tables.lines[line_id] for line_id in self.tables.lines_of.get(batch_id, {}).values())
        due = (line for line in lines if line.state is RequestState.QUEUED and line.next_attempt_at <= now)
        leased = []
        for line in heapq.nsmallest(max(limit, 0), due, key=lambda line: (line.prefix_group, line.line_no)):
            held = self._replace(
                line,
                state=RequestState.LEASED,
                lease_owner=owner,
                lease_expires_at=now + ttl_s,
                lease_seq=line.lease_seq + 1,
            )
            leased.append(
                LeasedLine(
                    id=held.id,
                    batch_id=held.batch_id,
                    line_no=held.line_no,
                    custom_id=held.custom_id,
                    offset=held.offset,
                    length=held.length,
                    attempts=held.attempts,
                    lease_seq=held.lease_seq,
                    est_prompt_tokens=held.est_prompt_tokens,
                    max_output_tokens=held.max_output_tokens,
                    prefix_group=held.prefix_group,
                )
            )
        return leased

    async def renew_leases(self, owner: str, now: float, ttl_s: float) -> None:
        for line in list(self.tables.lines.values()):
            if line.lease_owner == owner and line.state is RequestState.LEASED:
                self._replace(line, lease_expires_at=now + ttl_s)
        for row in self.tables.batches.values():
            if row.claimed_by == owner:
                row.claim_expires_at = now + ttl_s

    async def reclaim_lapsed_leases(self, now: float) -> int:
        lapsed = [
            line
            for line in self.tables.lines.values()
            if line.state is RequestState.LEASED and line.lease_expires_at is not None and line.lease_expires_at < now
        ]
        for line in lapsed:
            self._replace(line, state=RequestState.QUEUED, lease_owner=None, lease_expires_at=None)
        return len(lapsed)

    async def release_all_leases(self) -> int:
        leased = [line for line in self.tables.lines.values() if line.state is RequestState.LEASED]
        for line in leased:
            self._replace(line, state=RequestState.QUEUED, lease_owner=None, lease_expires_at=None)
        for row in self.tables.batches.values():
            row.claimed_by, row.claim_expires_at = None, None
        return len(leased)

    async def record(self, owner: str, updates: Sequence[LineUpdate]) -> int:
        by_batch: dict[str, list[LineUpdate]] = defaultdict(list)
        for u in updates:
            by_batch[u.batch_id].append(u)
        written = 0
        for batch_id, group in sorted(by_batch.items()):
            # As SqlStore: a batch's hand-backs are written before its results.
            for u in [u for u in group if not u.is_final]:
                if (line := self._held(owner, u)) is not None:
                    self._replace(
                        line,
                        state=RequestState.QUEUED,
                        attempts=u.attempts,
                        next_attempt_at=u.next_attempt_at,
                        lease_owner=None,
                        lease_expires_at=None,
                        error_message=u.error_message or line.error_message,
                    )
                    written += 1
            for u in [u for u in group if u.is_final]:
                if (line := self._held(owner, u)) is not None:
                    self._finish(line, u)
                    self._count(batch_id, u)
                    self._add_usage(batch_id, u)
                    self._keep_result(batch_id, u)
                    written += 1
        return written

    def _add_usage(self, batch_id: str, u: LineUpdate) -> None:
        row = self.tables.batches.get(batch_id)
        if row is None or u.state is not RequestState.SUCCEEDED:
            return
        kind = kind_of_api(row.batch.api.value)
        key = UsageKey(row.batch.tenant_id, row.batch.model or "", row_start(u.finished_at), kind)
        counts = UsageCounts.of_request(u.usage, u.capacity, cached=u.cached_from is not None)
        self.tables.usage[key] = self.tables.usage.get(key, UsageCounts()) + counts

    def _keep_result(self, batch_id: str, u: LineUpdate) -> None:
        row = self.tables.batches.get(batch_id)
        if row is None or u.state is not RequestState.SUCCEEDED or u.cache_key is None:
            return
        entry = self.tables.result_cache.get((row.batch.tenant_id, u.cache_key))
        if u.cached_from is not None:  # answered from the cache: its entry was used now
            if entry is not None:
                self.tables.result_cache[(row.batch.tenant_id, u.cache_key)] = (entry[0], entry[1], int(u.finished_at))
            return
        if u.body is None or u.status_code is None or u.result_id is None:
            return
        kept = CachedResult(u.result_id, u.status_code, u.request_id, u.body, u.usage)
        at = int(u.finished_at)
        self.tables.result_cache[(row.batch.tenant_id, u.cache_key)] = (kept, at, at)

    async def cached_result(self, tenant_id: str, key: str) -> CachedResult | None:
        entry = self.tables.result_cache.get((tenant_id, key))
        return None if entry is None else entry[0]

    async def trim_result_cache(self, max_entries: int) -> int:
        by_tenant: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        for (tenant_id, key), (_, created_at, used_at) in self.tables.result_cache.items():
            by_tenant[tenant_id].append((used_at, created_at, key))
        dropped = 0
        for tenant_id, entries in by_tenant.items():
            for _, _, key in sorted(entries)[: max(0, len(entries) - max_entries)]:
                del self.tables.result_cache[(tenant_id, key)]
                dropped += 1
        return dropped

    async def close_queued_lines(self, batch_id: str, state: RequestState, note: str | None = None) -> int:
        queued = [line for line in self.tables.lines_in(batch_id) if line.state is RequestState.QUEUED]
        for line in queued:
            self._replace(line, state=state, error_message=line.error_message or note)
        row = self.tables.batches.get(batch_id)
        if row is not None:
            row.batch.failed += len(queued)
        return len(queued)

    async def iter_results(self, batch_id: str, page_size: int = 2000) -> AsyncIterator[StoredResult]:
        last = 0
        while True:
            rows = [line for line in self.tables.lines_in(batch_id) if line.line_no > last][:page_size]
            for line in rows:
                yield StoredResult(
                    line.custom_id,
                    line.state,
                    line.result_id,
                    line.status_code,
                    line.request_id,
                    line.body,
                    line.error_code,
                    line.error_message,
                    line.cached_from,
                )
            if len(rows) < page_size:
                return
            last = rows[-1].line_no

    async def settled_successes(self, batch_id: str) -> int:
        settled = 0
        for line in self.tables.lines_in(batch_id):
            if line.state in (RequestState.QUEUED, RequestState.LEASED):
                break
            settled += line.state is RequestState.SUCCEEDED
        return settled

    async def line_state_counts(self, batch_id: str) -> dict[str, int]:
        return dict(Counter(line.state.value for line in self.tables.lines_in(batch_id)))

    def _held(self, owner: str, u: LineUpdate) -> StoredLine | None:
        """The line if this update's lease (owner and lease_seq) still holds it: the fence."""
        line = self.tables.lines.get(u.id)
        if line is None or line.state is not RequestState.LEASED:
            return None
        return line if (line.lease_owner, line.lease_seq) == (owner, u.lease_seq) else None

    def _finish(self, line: StoredLine, u: LineUpdate) -> None:
        self._replace(
            line,
            state=u.state,
            attempts=u.attempts,
            lease_owner=None,
            lease_expires_at=None,
            result_id=u.result_id,
            status_code=u.status_code,
            request_id=u.request_id,
            body=u.body,
            error_code=u.error_code,
            error_message=u.error_message,
            usage=u.usage,
            cached_from=u.cached_from,
        )

    def _count(self, batch_id: str, u: LineUpdate) -> None:
        """Counters and usage move with the line, in the same step: they never drift from the lines."""
        row = self.tables.batches.get(batch_id)
        if row is None:
            return
        if u.state is RequestState.SUCCEEDED:
            row.batch.completed += 1
            row.batch.usage = row.batch.usage + u.usage
        else:
            row.batch.failed += 1

    def _replace(self, line: StoredLine, **changes: Any) -> StoredLine:
        new = dataclasses.replace(line, **changes)
        self.tables.lines[line.id] = new
        return new
