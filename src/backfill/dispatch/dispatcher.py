"""The dispatcher loop: lease lines, send them with bounded concurrency, group-commit what came back.

One `Dispatcher` per process. Everything it does to a line goes through a lease (owner + lease_seq), so any
number of processes may run one against the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson
import structlog

from backfill import ids
from backfill.config import Settings
from backfill.dispatch.lifecycle import Lifecycle
from backfill.dispatch.pools import Pool, Start
from backfill.dispatch.watcher import EngineWatcher
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.lines import ValidationLimits
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.errors import BlobStoreUnavailable, Conflict, NotFound
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics, outcome_label
from backfill.policy.limits import EndpointLimits
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
        configured = {backend.name: backend for backend in settings.backends}
        by_model: dict[str, list[Backend]] = {}
        for backend in self.backends:
            for model in backend.models:
                by_model.setdefault(model, []).append(backend)
        self.limits: dict[str, EndpointLimits] = {}
        self.pools = {
            model: Pool.build(served, configured, preemption=settings.fair_share_preemption, shared=self.limits)
            for model, served in by_model.items()
        }
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
        self._aborts: dict[int, RequestState] = {}  # line id -> state to record when its task is cancelled
        self._abort_at: dict[str, tuple[float, RequestState]] = {}  # batch id -> (when, state)
        self._pending: list[LineUpdate] = []
        self._wake = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._tend_now = asyncio.Event()
        self._tending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False  # no more leasing: the process is stopping
        self._drained = asyncio.Event()  # the lines in flight are done or handed back: housekeeping ends
        self._batches: list[DispatchBatch] = []
        self._batches_at = 0.0
        self._dry: set[str] = set()  # batches with nothing leasable at the last look
        self._timer: asyncio.TimerHandle | None = None
        self._outlooks_at = 0.0
        self.interactive: InteractiveMeter | None = None  # the proxy's measurements, for harvested endpoints

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
        watcher = asyncio.create_task(self._watch_engines())
        try:
            while not stop.is_set():
                await self._fill()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
        finally:
            # Leasing has stopped; the housekeeper keeps this process's leases alive and the recorder keeps
            # committing while lines in flight get their grace, so no other worker takes them over meanwhile.
            self._stopping = True
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._shutdown()
            # Both end at their next turn rather than being cancelled: a task cancelled inside a database call
            # can leave the connection pool waiting for a connection that never comes back.
            self._drained.set()
            self._flush_now.set()
            await asyncio.gather(housekeeper, recorder)
            await self._flush()
            with contextlib.suppress(Exception):  # else they go stale within a few outlook intervals anyway
                await self.store.forget_rates(self.owner)

    # --- leasing and sending -------------------------------------------------------------------------------------

    async def _fill(self) -> None:
        now = self.clock()
        if now - self._batches_at >= self.settings.poll_interval_s:
            self._batches = await self.store.dispatchable_batches(now)
            self._batches_at = now
            self._dry.clear()
            for pool in self.pools.values():
                pool.prune()
            if now - self._outlooks_at >= self.settings.outlook_interval_s:
                await self._refresh_outlooks(now)
        ttl = self.settings.lease_ttl_s
        active: dict[str, int] = {}
        for batch in self._batches:
            active[batch.model] = active.get(batch.model, 0) + 1
        for batch in self._batches:
            serving = self.pools.get(batch.model)
            if serving is None or batch.id in self._abort_at or batch.id in self._dry:
                continue
            want = serving.lease_wanted(batch.id, active[batch.model])
            if want == 0:
                continue
            lines = await self.store.lease_lines(batch.id, self.owner, want, now, ttl)
            serving.add(batch, lines)
            if len(lines) < want:
                self._dry.add(batch.id)  # look again at the next refresh
        for pool in self.pools.values():
            self._start_from(pool)

    async def _refresh_outlooks(self, now: float) -> None:
        """Completion estimates at the rate of every worker together: each publishes what it serves per model."""
        self._outlooks_at = now
        mine = {model: pool.measure(now) for model, pool in self.pools.items()}
        try:
            stale_after_s = 3 * self.settings.outlook_interval_s + self.settings.poll_interval_s
            rates = await self.store.share_rates(self.owner, mine, now, stale_after_s)
        except Exception:
            log.exception("dispatcher.rates_failed")
            rates = mine
        shown: list[tuple[str, int | None, str | None]] = []
        for model, pool in self.pools.items():
            batches = (batch for batch in self._batches if batch.model == model)
            shown += pool.outlooks(now, batches, max(rates.get(model, 0.0), mine[model]))
        try:
            await self.store.set_outlooks(shown)
        except Exception:
            log.exception("dispatcher.outlooks_failed")

    def _start_from(self, pool: Pool) -> None:
        while not self._stopping:
            now = self.clock()
            start = pool.next_start(now)
            if not isinstance(start, Start):
                if math.isfinite(start):
                    self._wake_at(start)
                else:
                    self._preempt(pool, now)
                return
            task = asyncio.create_task(self._run_line(start, pool))
            self._in_flight[start.line.id] = _InFlight(start.line, start.batch, start.backend, task)

    def _preempt(self, pool: Pool, now: float) -> None:
        """Hand back young lines of a tenant over its fair share (uncharged) so a short tenant gets slots now;
        cancelling the request closes its connection, and the server drops it."""
        for start in pool.preempt(now):
            if self._hand_back(start):
                self.metrics.lines_preempted.labels(start.backend.name).inc()

    def _hand_back(self, start: Start) -> bool:
        """Abort a line in flight and return it to the queue uncharged (its task records that when cancelled)."""
        flight = self._in_flight.get(start.line.id)
        if flight is None:
            return False
        self._aborts[start.line.id] = RequestState.QUEUED
        flight.task.cancel()
        return True

    def _wake_at(self, when: float) -> None:
        """A rate limit or Retry-After holds lines back until `when`: look again then, not at the next poll."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self.clock())
        if self._timer is not None and self._timer.when() <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._wake.set)

    async def _run_line(self, start: Start, pool: Pool) -> None:
        line, batch, backend = start.line, start.batch, start.backend
        reported = False  # the slot taken at start goes back through on_finish or release, exactly once
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
            latency_s = time.monotonic() - started
            pool.finish(start, self.clock(), latency_s, outcome)
            reported = True
            self.metrics.backend_seconds.labels(backend.name).observe(latency_s)
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
        except BlobStoreUnavailable:
            # Its body could not be read (an S3 outage): nothing was sent, so back to the queue uncharged, a
            # little later.
            log.warning("dispatcher.line_unreadable", line_id=line.id, batch_id=batch.id)
            retry_at = self.clock() + self.settings.retry_base_s * (1 + self.rng.random())
            self._pending.append(
                LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, line.attempts, retry_at)
            )
        except Exception as exc:
            # Never strand the line: its lease would be renewed forever and the batch would never end.
            log.exception("dispatcher.line_crashed", line_id=line.id, batch_id=batch.id)
            outcome = Outcome(OutcomeKind.UNAVAILABLE, message=f"Running the request failed: {type(exc).__name__}")
            self._pending.append(self._after(line, batch, backend, outcome))
        finally:
            if not reported:
                pool.release(start)  # cancelled or crashed before the endpoint answered
            self._in_flight.pop(line.id, None)
            self._note_pending()
            self._wake.set()

    def _after(self, line: LeasedLine, batch: DispatchBatch, backend: Backend, outcome: Outcome) -> LineUpdate:
        now = self.clock()
        attempts = line.attempts + 1
        if outcome.kind is OutcomeKind.TIMEOUT and now >= batch.expires_at:
            # The request timeout is capped at the window's end, so this line was cut off by the window.
            return LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.EXPIRED, attempts)
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

    async def _watch_engines(self) -> None:
        """About once a second: engine metrics for the adaptive limits, harvest controllers for shared endpoints
        (dispatch/watcher.py); lines a harvest cut leaves above its ceiling are aborted and handed back."""
        watcher = EngineWatcher(
            self.settings, self.limits, self.pools, self.clock, self.metrics, self.interactive, self._share_tokens
        )
        if not watcher.active:
            return
        async with httpx.AsyncClient() as client:
            watcher.connect(client)
            while True:
                for _, start in await watcher.tick():
                    if self._hand_back(start):
                        self.metrics.lines_shed.labels(start.backend.name).inc()
                self._wake.set()
                await asyncio.sleep(self.settings.engine_metrics_interval_s)

    async def _share_tokens(self, mine: dict[str, int]) -> dict[str, dict[str, int]]:
        """The other live workers' batch-token counters per harvested backend, ours published for them."""
        stale_after_s = 5 * self.settings.engine_metrics_interval_s
        shared = await self.store.share_batch_tokens(self.owner, mine, self.clock(), stale_after_s)
        return {backend: {w: n for w, n in by.items() if w != self.owner} for backend, by in shared.items()}

    # --- group commit ------------------------------------------------------------------------------------------

    def _note_pending(self) -> None:
        if len(self._pending) >= self.settings.commit_max_results:
            self._flush_now.set()

    async def _recorder(self) -> None:
        while not self._drained.is_set():
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
        while not self._drained.is_set():
            try:
                now = self.clock()
                if now - renewed >= renew_every:
                    await self.store.renew_leases(self.owner, now, self.settings.lease_ttl_s)
                    renewed = now
                    if not self._stopping:
                        await self.store.reclaim_lapsed_leases(now)
                if not self._stopping:  # stopping, it only keeps the leases of the lines still in flight alive
                    if now - swept >= _FILE_SWEEP_S:
                        await self._delete_expired_files(int(now))
                        swept = now
                    await self._watch_batches(now)
                    for batch in await self.store.batches_to_tend(now):
                        if batch.id not in self._tending:
                            self._spawn_tend(batch.id, now)
            except Exception:
                log.exception("dispatcher.housekeeping_failed")
            wake = self._drained if self._stopping else self._tend_now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), renew_every if self._stopping else self.settings.poll_interval_s)
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
        mine |= {batch_id for pool in self.pools.values() for batch_id, lines in pool.ready.items() if lines}
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
            self._pending.extend(_closed(line, state) for line in pool.take_batch(batch_id))

    async def _shutdown(self) -> None:
        """Hand back buffered lines at once; give lines in flight and batch housekeeping under way (a finalize)
        `shutdown_grace_s` to finish, then abort what is left (lines go back uncharged)."""
        if self._timer is not None:
            self._timer.cancel()
        for pool in self.pools.values():
            for batch_id in list(pool.ready):
                self._pending.extend(_closed(line, RequestState.QUEUED) for line in pool.take_batch(batch_id))
        self._flush_now.set()  # hand them back now: another worker may lease them during our grace
        lines = [flight.task for flight in self._in_flight.values()]
        running = lines + list(self._tasks)
        still: set[asyncio.Task[None]] = set()
        if running:
            _, still = await asyncio.wait(running, timeout=self.settings.shutdown_grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        aborted = sum(task in still for task in lines)
        log.info("dispatcher.stopped", owner=self.owner, in_flight=len(lines), aborted=aborted)


def _closed(line: LeasedLine, state: RequestState) -> LineUpdate:
    """A line this worker gives up: back to the queue uncharged (QUEUED), or ended expired/cancelled."""
    return LineUpdate(line.id, line.batch_id, line.lease_seq, state, line.attempts)
