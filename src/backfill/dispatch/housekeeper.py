"""A worker's housekeeping: keep its leases alive, reclaim lapsed ones, sweep expired files and trim the result
cache, and tend batches (validate, expire, cancel, finalize — each claimed, so it runs once across workers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from backfill.config import Settings
from backfill.dispatch.lifecycle import Lifecycle
from backfill.errors import Conflict, NotFound
from backfill.ports import BlobStore, WorkerStore

log = structlog.get_logger(__name__)

_FILE_SWEEP_S = 60.0


class Housekeeper:
    def __init__(
        self,
        store: WorkerStore,
        blobs: BlobStore,
        lifecycle: Lifecycle,
        settings: Settings,
        clock: Callable[[], float],
        owner: str,
        *,
        before_tend: Callable[[], Awaitable[None]],
        watch_batches: Callable[[float], Awaitable[None]],
        renewed: Callable[[float], None],
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.lifecycle = lifecycle
        self.settings = settings
        self.clock = clock
        self.owner = owner
        self.before_tend = before_tend  # commit what this process knows: a batch's counters must include it
        self.watch_batches = watch_batches  # look for cancelled and expired batches among those this worker holds
        self.renewed = renewed  # every lease this worker holds runs until `at` + lease_ttl_s
        self.stopping = False  # only keep the leases of lines still in flight alive
        self.drained = asyncio.Event()  # nothing is in flight any more: stop
        self.tending: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._now = asyncio.Event()

    def poke(self) -> None:
        """A batch may need tending now (created, cancelled, or one of its lines just ended)."""
        self._now.set()

    async def run(self) -> None:
        renew_every = self.settings.lease_ttl_s / 3
        renewed = swept = 0.0
        while not self.drained.is_set():
            try:
                now = self.clock()
                if now - renewed >= renew_every:
                    await self.store.renew_leases(self.owner, now, self.settings.lease_ttl_s)
                    renewed = now
                    self.renewed(now)
                    if not self.stopping:
                        await self.store.reclaim_lapsed_leases(now)
                if not self.stopping:
                    if now - swept >= _FILE_SWEEP_S:
                        await self._delete_expired_files(int(now))
                        await self.store.trim_result_cache(self.settings.result_cache_max_entries)
                        swept = now
                    await self.watch_batches(now)
                    for batch in await self.store.batches_to_tend(now):
                        if batch.id not in self.tending:
                            self._spawn_tend(batch.id, now)
            except Exception:
                log.exception("dispatcher.housekeeping_failed")
            wake = self.drained if self.stopping else self._now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), renew_every if self.stopping else self.settings.poll_interval_s)
            self._now.clear()

    async def _delete_expired_files(self, now: int) -> None:
        """Files past `expires_at` go (never the input of an unfinished batch)."""
        for record in await self.store.expired_files(now):
            with contextlib.suppress(Conflict, NotFound):  # raced with a new batch, or another worker
                await self.store.delete_file(record.tenant_id, record.id)
                await self.blobs.delete(record.blob_key)

    def _spawn_tend(self, batch_id: str, now: float) -> None:
        self.tending.add(batch_id)
        task = asyncio.create_task(self._tend(batch_id, now))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tend(self, batch_id: str, now: float) -> None:
        try:
            if not await self.store.claim_batch(batch_id, self.owner, now, self.settings.lease_ttl_s):
                return
            try:
                await self.before_tend()
                batch = await self.store.get_batch(None, batch_id)
                if batch is not None:
                    await self.lifecycle.tend(batch, self.clock())
            finally:
                await self.store.release_batch(batch_id, self.owner)
        except Exception:
            log.exception("dispatcher.tend_failed", batch_id=batch_id)
        finally:
            self.tending.discard(batch_id)
