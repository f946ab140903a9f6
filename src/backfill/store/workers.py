"""What dispatcher processes tell each other through the database: the rate each serves per model pool, the
batch tokens each has sent to each harvested backend, and what each knows of each backend (for API replicas)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill.domain.endpoint_report import EndpointReport, combine
from backfill.domain.proxy_ttft import Published
from backfill.store.tables import proxy_ttft, worker_backends, worker_rates

_REPORTED = ("ceiling", "engine_waiting", "up", "ttft_baseline_s")


def _report_row(report: EndpointReport | None) -> dict[str, Any]:
    report = report or EndpointReport()
    return {"in_flight": report.in_flight, **{name: getattr(report, name) for name in _REPORTED}}


async def _publish(
    conn: AsyncConnection, table: Table, owner: str, rows: list[dict[str, Any]], now: float, stale_after_s: float
) -> None:
    """Replace `owner`'s rows of `table` with `rows`; drop rows not refreshed within `stale_after_s` (their
    processes stopped or died)."""
    await conn.execute(delete(table).where((table.c.owner == owner) | (table.c.updated_at < now - stale_after_s)))
    if rows:
        await conn.execute(insert(table), [{**row, "owner": owner, "updated_at": now} for row in rows])


class WorkerQueries:
    engine: AsyncEngine

    async def share_rates(
        self, owner: str, rates: Mapping[str, float], now: float, stale_after_s: float
    ) -> dict[str, float]:
        """Publish this process's rate per model; return every live process's rates summed per model."""
        rows = [{"model": model, "rate": rate} for model, rate in rates.items()]
        async with self.engine.begin() as conn:
            await _publish(conn, worker_rates, owner, rows, now, stale_after_s)
            totals = await conn.execute(
                select(worker_rates.c.model, func.sum(worker_rates.c.rate)).group_by(worker_rates.c.model)
            )
            return {model: float(total) for model, total in totals}

    async def share_batch_tokens(
        self,
        owner: str,
        tokens: Mapping[str, int],
        now: float,
        stale_after_s: float,
        reports: Mapping[str, EndpointReport] | None = None,
    ) -> dict[str, dict[str, int]]:
        """Publish this process's batch-token counter per harvested backend (and what it knows of each backend);
        return every live process's counters, by backend."""
        reports = reports or {}
        rows = [
            {"backend": backend, "batch_tokens": tokens.get(backend, 0), **_report_row(reports.get(backend))}
            for backend in {*tokens, *reports}
        ]
        table = worker_backends
        async with self.engine.begin() as conn:
            await _publish(conn, table, owner, rows, now, stale_after_s)
            shared: dict[str, dict[str, int]] = {}
            for backend, who, counter in await conn.execute(
                select(table.c.backend, table.c.owner, table.c.batch_tokens)
            ):
                shared.setdefault(backend, {})[who] = int(counter)
            return shared

    async def endpoint_reports(self, now: float, stale_after_s: float) -> dict[str, EndpointReport]:
        """What every live dispatcher process reports of each backend, combined (domain/endpoint_report.py)."""
        table = worker_backends
        columns = [table.c.backend, table.c.in_flight, *(table.c[name] for name in _REPORTED)]
        query = select(*columns).where(table.c.updated_at >= now - stale_after_s)
        by_backend: dict[str, list[EndpointReport]] = {}
        async with self.engine.connect() as conn:
            for backend, in_flight, ceiling, waiting, up, baseline in await conn.execute(query):
                report = EndpointReport(
                    in_flight=int(in_flight),
                    ceiling=ceiling,
                    engine_waiting=waiting,
                    up=None if up is None else bool(up),
                    ttft_baseline_s=baseline,
                )
                by_backend.setdefault(backend, []).append(report)
        return {backend: combine(reports) for backend, reports in by_backend.items()}

    async def share_ttft(
        self, owner: str, published: Mapping[str, Published], now: float, stale_after_s: float
    ) -> None:
        """Publish this API replica's interactive TTFT samples per backend (domain/proxy_ttft.py)."""
        rows = [
            {"backend": backend, "seq": mine.seq, "samples": orjson.dumps(mine.samples)}
            for backend, mine in published.items()
        ]
        async with self.engine.begin() as conn:
            await _publish(conn, proxy_ttft, owner, rows, now, stale_after_s)

    async def proxy_ttft(self, now: float, stale_after_s: float) -> dict[str, dict[str, Published]]:
        """Every live API replica's published TTFT samples: backend -> replica -> what it published."""
        table = proxy_ttft
        query = select(table.c.backend, table.c.owner, table.c.seq, table.c.samples).where(
            table.c.updated_at >= now - stale_after_s
        )
        published: dict[str, dict[str, Published]] = {}
        async with self.engine.connect() as conn:
            for backend, owner, seq, samples in await conn.execute(query):
                published.setdefault(backend, {})[owner] = Published(int(seq), tuple(orjson.loads(samples)))
        return published

    async def forget_rates(self, owner: str) -> None:
        """A process that stops takes its rates and counters with it."""
        async with self.engine.begin() as conn:
            for table in (worker_rates, worker_backends, proxy_ttft):
                await conn.execute(delete(table).where(table.c.owner == owner))
