"""What dispatcher processes tell each other through the database: the rate each serves per model pool, and the
batch tokens each has sent to each harvested backend."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from backfill.store.tables import worker_backends, worker_rates


class WorkerQueries:
    engine: AsyncEngine

    async def share_rates(
        self, owner: str, rates: Mapping[str, float], now: float, stale_after_s: float
    ) -> dict[str, float]:
        """Publish this process's rate per model; return every live process's rates summed per model.

        Rows not refreshed within `stale_after_s` belong to processes that stopped or died: they are dropped.
        """
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(worker_rates).where(
                    (worker_rates.c.owner == owner) | (worker_rates.c.updated_at < now - stale_after_s)
                )
            )
            if rates:
                rows = [{"owner": owner, "model": m, "rate": rate, "updated_at": now} for m, rate in rates.items()]
                await conn.execute(insert(worker_rates), rows)
            totals = await conn.execute(
                select(worker_rates.c.model, func.sum(worker_rates.c.rate)).group_by(worker_rates.c.model)
            )
            return {model: float(total) for model, total in totals}

    async def share_batch_tokens(
        self, owner: str, tokens: Mapping[str, int], now: float, stale_after_s: float
    ) -> dict[str, dict[str, int]]:
        """Publish this process's batch-token counter per backend; return every live process's, by backend."""
        table = worker_backends
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(table).where((table.c.owner == owner) | (table.c.updated_at < now - stale_after_s))
            )
            if tokens:
                rows = [{"owner": owner, "backend": b, "batch_tokens": n, "updated_at": now} for b, n in tokens.items()]
                await conn.execute(insert(table), rows)
            shared: dict[str, dict[str, int]] = {}
            for backend, who, counter in await conn.execute(
                select(table.c.backend, table.c.owner, table.c.batch_tokens)
            ):
                shared.setdefault(backend, {})[who] = int(counter)
            return shared

    async def forget_rates(self, owner: str) -> None:
        """A process that stops takes its rates and counters with it."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(worker_rates).where(worker_rates.c.owner == owner))
            await conn.execute(delete(worker_backends).where(worker_backends.c.owner == owner))
