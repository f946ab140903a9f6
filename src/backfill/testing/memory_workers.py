"""InMemoryStore's worker board: the rate each dispatcher process serves per model pool, and the batch tokens each
has sent to each harvested backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from backfill.domain.endpoint_report import EndpointReport, combine
from backfill.domain.proxy_ttft import Published
from backfill.testing.memory_tables import MemoryTables

_Value = TypeVar("_Value", int, float, EndpointReport, Published)


class MemoryWorkerBoard:
    tables: MemoryTables

    async def share_rates(
        self, owner: str, rates: Mapping[str, float], now: float, stale_after_s: float
    ) -> dict[str, float]:
        _publish(self.tables.worker_rates, owner, rates, now, stale_after_s)
        totals: dict[str, float] = {}
        for (_, model), (rate, _) in self.tables.worker_rates.items():
            totals[model] = totals.get(model, 0.0) + rate
        return totals

    async def share_batch_tokens(
        self,
        owner: str,
        tokens: Mapping[str, int],
        now: float,
        stale_after_s: float,
        reports: Mapping[str, EndpointReport] | None = None,
    ) -> dict[str, dict[str, int]]:
        reports = reports or {}
        backends = {*tokens, *reports}
        _publish(self.tables.worker_backends, owner, {b: tokens.get(b, 0) for b in backends}, now, stale_after_s)
        published = {b: reports.get(b, EndpointReport()) for b in backends}
        _publish(self.tables.worker_reports, owner, published, now, stale_after_s)
        shared: dict[str, dict[str, int]] = {}
        for (who, backend), (counter, _) in self.tables.worker_backends.items():
            shared.setdefault(backend, {})[who] = counter
        return shared

    async def endpoint_reports(self, now: float, stale_after_s: float) -> dict[str, EndpointReport]:
        by_backend: dict[str, list[EndpointReport]] = {}
        for (_, backend), (report, updated_at) in self.tables.worker_reports.items():
            if updated_at >= now - stale_after_s:
                by_backend.setdefault(backend, []).append(report)
        return {backend: combine(reports) for backend, reports in by_backend.items()}

    async def share_ttft(
        self, owner: str, published: Mapping[str, Published], now: float, stale_after_s: float
    ) -> None:
        _publish(self.tables.proxy_ttft, owner, published, now, stale_after_s)

    async def proxy_ttft(self, now: float, stale_after_s: float) -> dict[str, dict[str, Published]]:
        published: dict[str, dict[str, Published]] = {}
        for (owner, backend), (mine, updated_at) in self.tables.proxy_ttft.items():
            if updated_at >= now - stale_after_s:
                published.setdefault(backend, {})[owner] = mine
        return published

    async def forget_rates(self, owner: str) -> None:
        for table in (
            self.tables.worker_rates,
            self.tables.worker_backends,
            self.tables.worker_reports,
            self.tables.proxy_ttft,
        ):
            for key in [key for key in table if key[0] == owner]:
                del table[key]


def _publish(
    table: dict[tuple[str, str], tuple[_Value, float]],
    owner: str,
    values: Mapping[str, _Value],
    now: float,
    stale_after_s: float,
) -> None:
    """Replace `owner`'s rows with `values`; drop rows not refreshed within `stale_after_s` (their processes died)."""
    for key, (_, updated_at) in list(table.items()):
        if key[0] == owner or updated_at < now - stale_after_s:
            del table[key]
    for name, value in values.items():
        table[(owner, name)] = (value, now)
