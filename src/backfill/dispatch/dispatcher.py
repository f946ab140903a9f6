"""The dispatcher loop: lease lines, send them with bounded concurrency, group-commit what came back.

One `Dispatcher` per process. Everything it does to a line goes through a lease (owner + lease_seq), so any
number of processes may run one against the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
import structlog

from backfill import ids
from backfill.config import Settings
from backfill.dispatch.lifecycle import Lifecycle
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.lines import ValidationLimits
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.errors import Conflict, NotFound
from backfill.metrics import Metrics, outcome_label
from backfill.policy.retry import RetryPolicy, Verdict
from backfill.ports import Backend, BlobStore
from backfill.store.sql import SqlStore

log = structlog.get_logger(__name__)

_FILE_SWEEP_S = 60.0


@dataclass
class _InFlight:
    line: LeasedLine
    batch: DispatchBatch
    backend: Backend
    task: asyncio.Task[None]


@dataclass
class _Pool:
    """The backends that serve one model, and the lines leased for it but not yet sent."""

    backends: list[Backend]
    buffer: deque[tuple[LeasedLine, DispatchBatch]] = field(default_factory=deque)

    @property
    def capacity(self) -> int:
        return sum(backend.max_concurrency for backend in self.backends)


class Dispatcher:
    def __init__(
        self,
        store: SqlStore,
        blobs: BlobStore,
        backends: Sequence[Backend],
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.clock = clock
        self.owner = owner or ids.owner_id()
        self.rng = rng or random.Random()
        self.metrics = metrics or Metrics()
        self.retry = RetryPolicy(settings.max_attempts, settings.retry_base_s, settings.retry_max_s)
        self.backends = list(backends)
        self.pools: dict[str, _Pool] = {}
        for backend in self.backends:
            for model in backend.models:
                self.pools.setdefault(model, _Pool([])).backends.append(backend)
        self.lifecycle = Lifecycle(
            store,
            blobs,
            ValidationLimits(
                settings.max_lines,
                settings.max_line_bytes,
                settings.max_embedding_inputs,
                settings.max_reported_errors,
            ),
            self.is_served,
            self.owner,
            settings.default_enqueued_token_limit,
            self.metrics,
        )
        self._in_flight: dict[int, _InFlight] = {}
        self._load: dict[str, int] = defaultdict(int)  # backend name -> lines in flight
        self._paused_until: dict[str, float] = {}
        self._aborts: dict[int, RequestState] = {}  # line id -> state to record when its task is cancelled
        self._abort_at: dict[str, tuple[float, RequestState]] = {}  # batch id -> (when, state)
        self._pending: list[LineUpdate] = []
        self._wake = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._tend_now = asyncio.Event()
        self._tending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._batches: list[DispatchBatch] = []
        self._batches_at = 0.0

    # --- public ---------------------------------------------------------------------------------------------

    def is_served(self, model: str) -> bool:
        return model in self.pools

    def wake(self) -> None:
        """Something changed (a batch was created or cancelled): look now rather than at the next poll."""
        self._batches_at = 0.0
        self._wake.set()
        self._tend_now.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then hand back what is not done (uncharged) and flush."""
        recorder = asyncio.create_task(self._recorder())
        housekeeper = asyncio.create_task(self._housekeeper())
        try:
            while not stop.is_set():
                await self._fill()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
        finally:
            self._stopping = True
            housekeeper.cancel()
            await self._shutdown()
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeper
            await self._flush()

    # --- leasing and sending -------------------------------------------------------------------------------------

    async def _fill(self) -> None:
        now = self.clock()
        if now - self._batches_at >= self.settings.poll_interval_s:
            self._batches = await self.store.dispatchable_batches(now)
            self._batches_at = now
        ttl = self.settings.lease_ttl_s
        for batch in list(self._batches):
            pool = self.pools.get(batch.model)
            if pool is None or batch.id in self._abort_at:
                continue
            want = 2 * pool.capacity - self._pool_load(pool) - len(pool.buffer)
            if want < max(1, pool.capacity // 8):
                continue
            lines = await self.store.lease_lines(batch.id, self.owner, want, now, ttl)
            pool.buffer.extend((line, batch) for line in lines)
            if len(lines) < want:
                self._batches.remove(batch)  # dry for now: look again at the next refresh
        for pool in self.pools.values():
            self._start_from(pool)

    def _pool_load(self, pool: _Pool) -> int:
        return sum(self._load[backend.name] for backend in pool.backends)

    def _pick_backend(self, pool: _Pool) -> Backend | None:
        now = self.clock()
        best: Backend | None = None
        for backend in pool.backends:
            free = backend.max_concurrency - self._load[backend.name]
            if free <= 0 or self._paused_until.get(backend.name, 0.0) > now:
                continue
            if best is None or self._load[backend.name] / backend.max_concurrency < (
                self._load[best.name] / best.max_concurrency
            ):
                best = backend
        return best

    def _start_from(self, pool: _Pool) -> None:
        while pool.buffer and not self._stopping:
            backend = self._pick_backend(pool)
            if backend is None:
                return
            line, batch = pool.buffer.popleft()
            self._load[backend.name] += 1
            task = asyncio.create_task(self._run_line(line, batch, backend))
            self._in_flight[line.id] = _InFlight(line, batch, backend, task)

    async def _run_line(self, line: LeasedLine, batch: DispatchBatch, backend: Backend) -> None:
        try:
            raw = await self.blobs.read_range(batch.input_blob_key, line.offset, line.length)
            body = orjson.dumps(orjson.loads(raw)["body"])
            # A line in flight when the window closes gets the same grace as one in flight at a cancel.
            left_s = batch.expires_at - self.clock() + self.settings.cancel_grace_s
            timeout = max(1.0, min(self.settings.request_timeout_s, left_s))
            self.metrics.in_flight.labels(backend.name).inc()
            started = time.monotonic()
            try:
                outcome = await backend.send(batch.endpoint, body, timeout)
            finally:
                self.metrics.in_flight.labels(backend.name).dec()
            self.metrics.backend_seconds.labels(backend.name).observe(time.monotonic() - started)
            self.metrics.backend_requests.labels(backend.name, outcome_label(outcome)).inc()
            update = self._after(line, batch, backend, outcome)
            if update.is_final:
                self.metrics.lines_finished.labels(update.state.value).inc()
            else:
                self.metrics.line_retries.labels(backend.name).inc()
            self._pending.append(update)
        except asyncio.CancelledError:
            state = self._aborts.pop(line.id, RequestState.QUEUED)
            self._pending.append(_closed(line, state))
            raise
        except Exception as exc:
            # Never strand the line: its lease would be renewed forever and the batch would never end.
            log.exception("dispatcher.line_crashed", line_id=line.id, batch_id=batch.id)
            outcome = Outcome(OutcomeKind.UNAVAILABLE, message=f"Running the request failed: {type(exc).__name__}")
            self._pending.append(self._after(line, batch, backend, outcome))
        finally:
            self._in_flight.pop(line.id, None)
            self._load[backend.name] -= 1
            self._note_pending()
            self._wake.set()

    def _after(self, line: LeasedLine, batch: DispatchBatch, backend: Backend, outcome: Outcome) -> LineUpdate:
        now = self.clock()
        attempts = line.attempts + 1
        if outcome.kind is OutcomeKind.TIMEOUT and now >= batch.expires_at:
            # The request timeout is capped at the window's end, so this line was cut off by the window.
            return LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.EXPIRED, attempts)
        if outcome.status_code == 429 and outcome.retry_after_s:
            self._paused_until[backend.name] = max(
                self._paused_until.get(backend.name, 0.0), now + min(outcome.retry_after_s, 60.0)
            )
        decision = self.retry.decide(outcome, attempts, now, batch.expires_at, self.rng)
        if decision.verdict is Verdict.RETRY:
            assert decision.retry_at is not None
            return LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, attempts, decision.retry_at)
        state = RequestState.SUCCEEDED if decision.verdict is Verdict.SUCCEED else RequestState.FAILED
        has_response = outcome.kind in (OutcomeKind.SUCCESS, OutcomeKind.HTTP_ERROR)
        return LineUpdate(
            line.id,
            line.batch_id,
            line.lease_seq,
            state,
            attempts,
            result_id=ids.batch_request_id(),
            status_code=outcome.status_code if has_response else None,
            request_id=(outcome.request_id or ids.request_id()) if has_response else None,
            body=outcome.body if has_response else None,
            error_code=None if has_response else outcome.error_code,
            error_message=None if has_response else f"{outcome.message} ({decision.reason}).",
            usage=outcome.usage,
        )

    # --- group commit ------------------------------------------------------------------------------------------

    def _note_pending(self) -> None:
        if len(self._pending) >= self.settings.commit_max_results:
            self._flush_now.set()

    async def _recorder(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self.settings.commit_interval_s)
            self._flush_now.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        updates, self._pending = self._pending, []
        started = time.monotonic()
        try:
            await self.store.record(self.owner, updates)
            self.metrics.commit_seconds.observe(time.monotonic() - started)
            self.metrics.commit_lines.inc(len(updates))
            if any(update.is_final for update in updates):
                self._tend_now.set()  # a batch may have just finished: finalize without waiting for the poll
        except Exception:
            log.exception("dispatcher.record_failed", lines=len(updates))
            self._pending[:0] = updates  # keep them; the next flush tries again
            await asyncio.sleep(self.settings.commit_interval_s)

    # --- housekeeping ----------------------------------------------------------------------------------------

    async def _housekeeper(self) -> None:
        renew_every = self.settings.lease_ttl_s / 3
        renewed = swept = 0.0
        while True:
            try:
                now = self.clock()
                if now - renewed >= renew_every:
                    await self.store.renew_leases(self.owner, now, self.settings.lease_ttl_s)
                    await self.store.reclaim_lapsed_leases(now)
                    renewed = now
                if now - swept >= _FILE_SWEEP_S:
                    await self._delete_expired_files(int(now))
                    swept = now
                await self._watch_batches(now)
                for batch in await self.store.batches_to_tend(now):
                    if batch.id not in self._tending:
                        self._spawn_tend(batch.id, now)
            except Exception:
                log.exception("dispatcher.housekeeping_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tend_now.wait(), self.settings.poll_interval_s)
            self._tend_now.clear()

    async def _delete_expired_files(self, now: int) -> None:
        """Files past `expires_at` go (never the input of an unfinished batch)."""
        for record in await self.store.expired_files(now):
            with contextlib.suppress(Conflict, NotFound):  # raced with a new batch, or another worker
                await self.store.delete_file(record.tenant_id, record.id)
                await self.blobs.delete(record.blob_key)

    def _spawn_tend(self, batch_id: str, now: float) -> None:
        self._tending.add(batch_id)
        task = asyncio.create_task(self._tend(batch_id, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tend(self, batch_id: str, now: float) -> None:
        try:
            if not await self.store.claim_batch(batch_id, self.owner, now, self.settings.lease_ttl_s):
                return
            try:
                await self._flush()  # counters must include what this process already knows
                batch = await self.store.get_batch(None, batch_id)
                if batch is not None:
                    await self.lifecycle.tend(batch, self.clock())
            finally:
                await self.store.release_batch(batch_id, self.owner)
        except Exception:
            log.exception("dispatcher.tend_failed", batch_id=batch_id)
        finally:
            self._tending.discard(batch_id)

    async def _watch_batches(self, now: float) -> None:
        """Stop work on batches that are cancelling or past their window: drop buffered lines at once, abort
        in-flight ones after the grace period."""
        mine = {flight.batch.id for flight in self._in_flight.values()}
        mine |= {batch.id for pool in self.pools.values() for _, batch in pool.buffer}
        for batch_id, (status, expires_at) in (await self.store.batch_statuses(sorted(mine))).items():
            if status is BatchStatus.CANCELLING:
                state = RequestState.CANCELLED
            elif now >= expires_at or status.is_terminal:
                state = RequestState.EXPIRED
            else:
                continue
            self._abort_at.setdefault(batch_id, (now + self.settings.cancel_grace_s, state))
        for batch_id, (when, state) in list(self._abort_at.items()):
            self._drop_buffered(batch_id, state)
            flights = [f for f in self._in_flight.values() if f.batch.id == batch_id]
            if not flights:
                del self._abort_at[batch_id]
            elif now >= when:
                for flight in flights:
                    self._aborts[flight.line.id] = state
                    flight.task.cancel()

    def _drop_buffered(self, batch_id: str, state: RequestState) -> None:
        for pool in self.pools.values():
            kept: deque[tuple[LeasedLine, DispatchBatch]] = deque()
            for line, batch in pool.buffer:
                if batch.id == batch_id:
                    self._pending.append(_closed(line, state))
                else:
                    kept.append((line, batch))
            pool.buffer = kept

    async def _shutdown(self) -> None:
        """Hand back buffered lines, give in-flight ones a grace period, then abort them (uncharged)."""
        for pool in self.pools.values():
            while pool.buffer:
                line, _ = pool.buffer.popleft()
                self._pending.append(_closed(line, RequestState.QUEUED))
        flights = [flight.task for flight in self._in_flight.values()]
        if flights:
            _, still = await asyncio.wait(flights, timeout=self.settings.cancel_grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _closed(line: LeasedLine, state: RequestState) -> LineUpdate:
    """A line this worker gives up: back to the queue uncharged (QUEUED), or ended expired/cancelled."""
    return LineUpdate(line.id, line.batch_id, line.lease_seq, state, line.attempts)
