"""InMemoryStore's usage rows and the ended batches the SLA report reads (as SqlStore's store.usage)."""

from __future__ import annotations

from collections.abc import Mapping

from backfill.domain.batches import RequestState
from backfill.domain.usage_report import EndedBatch, UsageCounts, UsageKey, UsageRows
from backfill.testing.memory_tables import MemoryTables


class MemoryUsage:
    tables: MemoryTables

    async def add_usage(self, rows: Mapping[UsageKey, UsageCounts]) -> None:
        for key, counts in rows.items():
            self.tables.usage[key] = self.tables.usage.get(key, UsageCounts()) + counts

    async def usage_rows(self, start: int, end: int, tenant_id: str | None = None) -> UsageRows:
        rows = [
            (key, counts)
            for key, counts in self.tables.usage.items()
            if start <= key.start_time < end and tenant_id in (None, key.tenant_id)
        ]
        return sorted(rows, key=lambda row: row[0])

    async def ended_batches(self, start: int, end: int, tenant_id: str | None = None) -> list[EndedBatch]:
        ended = []
        for row in self.tables.batches.values():
            batch = row.batch
            ended_at = getattr(batch, f"{batch.status.value}_at", None) if batch.status.is_terminal else None
            if ended_at is None or not start <= ended_at < end or tenant_id not in (None, batch.tenant_id):
                continue
            expired = sum(line.state is RequestState.EXPIRED for line in self.tables.lines_in(batch.id))
            ended.append(
                EndedBatch(
                    batch.tenant_id,
                    batch.completion_window,
                    batch.status.value,
                    batch.created_at,
                    ended_at,
                    batch.expires_at,
                    expired,
                )
            )
        return ended
