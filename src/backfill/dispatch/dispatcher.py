"""The asyncio dispatcher: performs the dispatch core's actions against the store, the blob store and the backends,
and feeds what happened back to it (core/events.py has the protocol).

One `Dispatcher` per process. Everything it does to a line goes through a lease (owner + lease_seq), so any
number of processes may run one against the same database. Four tasks: the fill loop (lease and start), the
recorder (group commit), the housekeeper (leases, tending batches) and the engine watcher; plus one task per line
in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import orjson
import structlog
from prometheus_client import Counter

from backfill import ids
from backfill.config import Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import (
    Abort,
    AbortReason,
    Action,
    Answered,
    BatchesRead,
    BatchStates,
    Changed,
    EndpointChanged,
    Fill,
    GraceOver,
    Grant,
    Lease,
    Leased,
    ModelLoading,
    Probe,
    RatesShared,
    Record,
    SetCeiling,
    ShareRates,
    ShowOutlooks,
    Stop,
    Unanswered,
    Unsent,
    WakeAt,
)
from backfill.core.pool import Start
from backfill.dispatch.coalesced import read_lines, send_together
from backfill.dispatch.endpoints import EndpointMonitor
from backfill.dispatch.housekeeper import Housekeeper
from backfill.dispatch.lifecycle import Lifecycle
from backfill.dispatch.recorder import Recorder
from backfill.dispatch.result_cache import ResultCacheLookups
from backfill.dispatch.watcher import EngineWatcher
from backfill.domain.batches import RequestState, ScheduleState
from backfill.domain.leases import LeasedLine
from backfill.domain.lines import ValidationLimits
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.errors import BlobStoreUnavailable
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics, outcome_label
from backfill.ports import Backend, BlobStore, LoadsModel, WorkerStore

log = structlog.get_logger(__name__)
_MAX_INPUTS = 32  # inputs a coalesced request may carry to an in-process engine (config.py has the reasons)


class _Request:
    """Lines in flight together in one upstream request (coalesced embeddings or moderations lines)."""

    def __init__(self, starts: list[Start]) -> None:
        self.starts = starts
        self.aborted: set[int] = set()  # line ids the core aborted: they end unsent, whatever the answer says
        self.answered = False  # the answer is being handed out: too late to cancel
        self.task: asyncio.Task[None] | None = None


class Dispatcher:
    def __init__(
        self,
        store: WorkerStore,
        blobs: BlobStore,
        backends: Sequence[Backend],
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        metrics_transport: httpx.AsyncBaseTransport | None = None,
        core: DispatchCore | None = None,
    ) -> None:
        """`metrics_transport`: how engines' /metrics are fetched (tests script it); plain HTTP by default.
        `core`: the dispatch core to drive (tests give one that records its decisions); built from `settings`."""
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.clock = clock
        self.owner = owner or ids.owner_id()
        self.metrics = metrics or Metrics()
        self.backends = {backend.name: backend for backend in backends}
        self.core = core or DispatchCore(settings, [(backend, backend.models) for backend in backends], rng=rng)
        limits = ValidationLimits(
            settings.max_lines, settings.max_line_bytes, settings.max_embedding_inputs, settings.max_reported_errors
        )
        token_limit = settings.default_enqueued_token_limit
        self.lifecycle = Lifecycle(
            store, blobs, limits, self.core.is_served, self.owner, token_limit, self.metrics,
            waiting_for=self.core.waiting_for, started=self.wake,
        )  # fmt: skip
        self.recorder = Recorder(store, self.owner, settings, self.metrics, on_final=lambda: self.housekeeper.poke())
        self.housekeeper = Housekeeper(
            store, blobs, self.lifecycle, settings, clock, self.owner,
            before_tend=self.recorder.flush, watch_batches=self._watch_batches, renewed=self._renewed,
        )  # fmt: skip
        self.interactive: InteractiveMeter | None = None  # the proxy's measurements, for harvested endpoints
        self.cache = ResultCacheLookups(store, settings, self.metrics)
        self.endpoints = EndpointMonitor(self.backends, self.core, self.metrics, clock, self._perform_and_look)
        self.watcher: EngineWatcher | None = None
        self.running = False  # `run` has started (an API-only process never runs its dispatcher)
        self._transport = metrics_transport
        self._lines: dict[int, asyncio.Task[None]] = {}
        self._requests: dict[int, _Request] = {}  # by line id, each line of a coalesced request in flight
        self._max_inputs = {backend.name: backend.max_inputs_per_request for backend in settings.backends}
        self._wake = asyncio.Event()
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # the loop time `_timer` fires at
        self._announced: set[str] = set()  # batches whose at-risk webhook is queued
        # Leased lines not yet sent, with when their lease was taken; and when every lease held was last renewed.
        # A line whose lease may have lapsed is never started, nor sent once its input is read (`_lapsing`).
        self._leased_at: dict[int, float] = {}
        self._renewed_at = -float("inf")
        self._finished_counters: dict[RequestState, Counter] = {}

    def wake(self) -> None:
        """Something changed (a batch was created or cancelled): look now rather than at the next poll."""
        self.core.handle(Changed(), self.clock())
        self._wake.set()
        self.housekeeper.poke()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then hand back what is not done (uncharged) and flush."""
        self.running = True
        await self.endpoints.check_all()
        loads = [
            asyncio.create_task(self._load(name, backend))
            for name, backend in self.backends.items()
            if isinstance(backend, LoadsModel)
        ]
        drained = self.housekeeper.drained
        recorder = asyncio.create_task(self.recorder.run(drained))
        housekeeper = asyncio.create_task(self.housekeeper.run())
        engines = self.watcher = EngineWatcher(
            self.settings, self.core, self.store, self.owner, self.clock, self.interactive,
            transport=self._transport, metrics=self.metrics,
        )  # fmt: skip
        watcher = asyncio.create_task(engines.run(self._perform_and_look))
        try:
            while not stop.is_set():
                await self._fill()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
        finally:
            # Leasing has stopped; the housekeeper keeps this process's leases alive and the recorder keeps
            # committing while lines in flight get their grace, so no other worker takes them over meanwhile.
            self.housekeeper.stopping = True
            for task in [watcher, *loads]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(watcher, *loads)
            await self._shutdown()
            # Both end at their next turn rather than being cancelled: a task cancelled inside a database call
            # can leave the connection pool waiting for a connection that never comes back.
            drained.set()
            self.recorder.flush_soon()
            await asyncio.gather(housekeeper, recorder)
            await self.recorder.flush()
            with contextlib.suppress(Exception):  # else they go stale within a few outlook intervals anyway
                await self.store.forget_rates(self.owner)

    async def _load(self, name: str, backend: LoadsModel) -> None:
        """Load an in-process engine's model now rather than at its first line; meanwhile its batches say so."""
        self.core.handle(ModelLoading(name, self.clock()), self.clock())
        try:
            await backend.load()
        except Exception:  # its lines fail with the reason when they are sent
            log.exception("backend.load_failed", backend=name)
        finally:
            self.core.handle(ModelLoading(name, None), self.clock())
        self._wake.set()

    async def _fill(self) -> None:
        now = self.clock()
        if self.core.poll_due(now):
            batches = await self.store.dispatchable_batches(now)
            for action in self.core.handle(BatchesRead(batches), now):
                if isinstance(action, ShareRates):
                    await self._refresh_outlooks(action.mine, now)
        grants = []
        actions = self.core.handle(Fill(), now)
        if any(isinstance(action, Lease) for action in actions):
            # Start what is buffered first: a lease waits its turn behind the group commit on the store's one
            # writer, and free slots should not wait with it (the buffer is topped up while half of it is left).
            self._perform(self.core.handle(Leased([]), now))
        for action in actions:
            if isinstance(action, Lease):
                lines = await self.store.lease_lines(
                    action.batch.id, self.owner, action.count, now, self.settings.lease_ttl_s
                )
                self._leased_at.update(dict.fromkeys([line.id for line in lines], now))
                grants.append(Grant(action.batch, lines, action.count))
            else:
                self._perform([action])  # probes of endpoints that are down, and when to look again
        self._perform(self.core.handle(Leased(grants), now))

    async def _refresh_outlooks(self, mine: Mapping[str, float], now: float) -> None:
        """Completion estimates at the rate of every worker together: each publishes what it serves per model."""
        try:
            stale_after_s = 3 * self.settings.outlook_interval_s + self.settings.poll_interval_s
            rates: Mapping[str, float] = await self.store.share_rates(self.owner, dict(mine), now, stale_after_s)
        except Exception:
            log.exception("dispatcher.rates_failed")
            rates = mine
        for action in self.core.handle(RatesShared(rates), now):
            if isinstance(action, ShowOutlooks):
                try:
                    await self.store.set_outlooks(action.rows, action.waiting)
                    await self._announce_at_risk(action.rows, now)
                except Exception:
                    log.exception("dispatcher.outlooks_failed")

    async def _announce_at_risk(self, rows: Sequence[tuple[str, int | None, str | None]], now: float) -> None:
        """Batches just promoted because their deadline is in danger get their `batch.at_risk` webhook (the store
        queues it once per batch, across workers; this set only spares it the question every outlook)."""
        danger = (ScheduleState.PROMOTED.value, ScheduleState.AT_RISK.value)
        fresh = [batch_id for batch_id, _, state in rows if state in danger and batch_id not in self._announced]
        if fresh:
            await self.store.announce_at_risk(fresh, int(now))
            self._announced.update(fresh)

    def _perform(self, actions: Sequence[Action]) -> None:
        together: dict[int, list[Start]] = {}  # a coalesced request's lines come one after another
        lapsing: list[Start] = []
        for action in actions:
            match action:
                case Start():
                    self._start(action, together, lapsing)
                case Abort():
                    self._abort(action)
                case Record(update):
                    self._leased_at.pop(update.id, None)  # a line answered, handed back or closed
                    self.recorder.add(update)
                case WakeAt(when):
                    self._wake_at(when)
                case SetCeiling(endpoint, ceiling, baseline):
                    self.metrics.harvest_limit.labels(endpoint).set(ceiling)
                    if baseline is not None:
                        self.metrics.harvest_ttft_baseline.labels(endpoint).set(baseline)
                case Probe(endpoint):
                    self.endpoints.probe(endpoint)
                case EndpointChanged():
                    self.endpoints.changed(action)
                case _:
                    raise TypeError(f"{type(action).__name__} is not performed here")
        for starts in together.values():
            self._start_request(starts)
        if lapsing:
            self._hand_back_lapsing(lapsing)

    def _start(self, start: Start, together: dict[int, list[Start]], lapsing: list[Start]) -> None:
        if self._lapsing(start.line.id):
            lapsing.append(start)
        elif start.request:
            together.setdefault(start.request, []).append(start)
        else:
            line_task = asyncio.create_task(self._run_line(start))
            line_task.add_done_callback(functools.partial(self._line_ended, start.line.id))
            self._lines[start.line.id] = line_task

    def _renewed(self, at: float) -> None:
        self._renewed_at = at

    def _lapsing(self, line_id: int) -> bool:
        """Whether a line about to start, or to be sent once its input is read, may have lost its lease: its lease
        ran out, or will within a third of `lease_ttl_s` (the renewals have failed meanwhile: a database in trouble,
        a loop stalled). Another worker may then take the line over and run it, and even commit its success before
        this one would send it."""
        leased_at = self._leased_at.get(line_id)
        if leased_at is None:  # sent already
            return False
        lapses_at = max(leased_at, self._renewed_at) + self.settings.lease_ttl_s
        return self.clock() >= lapses_at - self.settings.lease_ttl_s / 3

    def _not_lapsing(
        self, lines: list[LeasedLine], bodies: list[dict[str, Any]], keys: list[str | None]
    ) -> tuple[list[LeasedLine], list[dict[str, Any]], list[str | None]]:
        """The lines of a coalesced request about to be sent whose lease still holds (with their bodies and keys);
        the others go back unsent, as at their start."""
        # Renewed within two thirds of a lease (the usual case): none can lapse; one look for the whole request.
        renewed_lately = self.clock() < self._renewed_at + self.settings.lease_ttl_s * 2 / 3
        lapsing = [] if renewed_lately else [line for line in lines if self._lapsing(line.id)]
        if lapsing:
            log.warning("dispatcher.leases_lapsing", lines=len(lapsing), renewed_at=self._renewed_at)
            self._unsend(lapsing, Unanswered.ABORTED)
            gone = {line.id for line in lapsing}
            kept = [i for i, line in enumerate(lines) if line.id not in gone]
            lines, bodies, keys = [lines[i] for i in kept], [bodies[i] for i in kept], [keys[i] for i in kept]
        for line in lines:
            self._leased_at.pop(line.id, None)
        return lines, bodies, keys

    def _hand_back_lapsing(self, starts: Sequence[Start]) -> None:
        """Lines whose lease may have lapsed go back to the queue unsent and uncharged (the write is fenced: where
        another worker holds the line by now, it changes nothing)."""
        log.warning("dispatcher.leases_lapsing", lines=len(starts), renewed_at=self._renewed_at)
        now = self.clock()
        for start in starts:
            self._perform(self.core.handle(Unsent(start.line.id, Unanswered.ABORTED), now))
        self._wake.set()

    def _start_request(self, starts: list[Start]) -> None:
        request = _Request(starts)
        task = request.task = asyncio.create_task(self._run_request(request))
        for start in starts:
            self._lines[start.line.id] = task
            self._requests[start.line.id] = request
        task.add_done_callback(functools.partial(self._request_ended, request))

    def _abort(self, abort: Abort) -> None:
        running = self._lines.get(abort.line_id)
        if running is None:
            return
        if not self._abort_in_request(abort.line_id):
            running.cancel()  # closing the request's connection makes the server drop it
        if abort.reason is AbortReason.PREEMPTED:
            self.metrics.lines_preempted.labels(abort.endpoint).inc()
        elif abort.reason is AbortReason.SHED:
            self.metrics.lines_shed.labels(abort.endpoint).inc()

    def _abort_in_request(self, line_id: int) -> bool:
        """An aborted line of a coalesced request: the request is cancelled once every line of it is aborted,
        else it runs on for the others and this line ends unsent. False: the line is not in such a request."""
        request = self._requests.get(line_id)
        if request is None:
            return False
        request.aborted.add(line_id)
        if len(request.aborted) == len(request.starts) and not request.answered and request.task is not None:
            request.task.cancel()
        return True

    def _request_ended(self, request: _Request, task: asyncio.Task[None]) -> None:
        for start in request.starts:
            self._requests.pop(start.line.id, None)
            self._line_ended(start.line.id, task)

    def _line_ended(self, line_id: int, task: asyncio.Task[None]) -> None:
        """A line's task is done. One cancelled before it ever ran (aborted in the tick that started it) never
        reached its own handler: tell the core here, or the line would stay in flight for good."""
        self._lines.pop(line_id, None)
        if task.cancelled() and line_id in self.core.flights:
            self._perform(self.core.handle(Unsent(line_id, Unanswered.ABORTED), self.clock()))
            self._wake.set()

    def _perform_and_look(self, actions: Sequence[Action]) -> None:
        self._perform(actions)
        self._wake.set()

    def _wake_at(self, when: float) -> None:
        """A rate limit or Retry-After holds lines back until `when`: look again then, not at the next poll."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self.clock())
        # The deadline is kept here: uvloop answers call_later(0) with a plain Handle, which has no `when()`.
        if self._timer is not None and not self._timer.cancelled() and self._timer_at <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = loop.time() + delay
        self._timer = loop.call_later(delay, self._fire_timer)

    def _fire_timer(self) -> None:
        self._timer = None
        self._wake.set()

    async def _run_line(self, start: Start) -> None:
        line, batch, backend = start.line, start.batch, self.backends[start.endpoint]
        try:
            raw = await self.blobs.read_range(batch.input_blob_key, line.offset, line.length)
            parsed = orjson.loads(raw)["body"]
            key = await self.cache.key(batch, backend, parsed)
            if key is not None and (hit := await self.cache.lookup(batch, key)) is not None:
                self._answer(line, backend.name, hit, 0.0, key)
                return
            body = orjson.dumps(parsed)
            if self._lapsing(line.id):  # its input took long to read, and the renewals have failed meanwhile
                self._hand_back_lapsing([start])
                return
            self._leased_at.pop(line.id, None)
            # A line in flight when the window closes gets the same grace as one in flight at a cancel.
            left_s = batch.expires_at - self.clock() + self.settings.cancel_grace_s
            timeout = max(1.0, min(self.settings.request_timeout_s, left_s))
            self.metrics.in_flight.labels(backend.name).inc()
            started = self.clock()  # the dispatcher's clock throughout, so that a virtual one drives it all
            try:
                outcome = await backend.send(batch.endpoint, body, timeout)
            finally:
                self.metrics.in_flight.labels(backend.name).dec()
            latency_s = max(0.0, self.clock() - started)
            self.metrics.backend_seconds.labels(backend.name).observe(latency_s)
            self.metrics.backend_requests.labels(backend.name, outcome_label(outcome)).inc()
            self._answer(line, backend.name, outcome, latency_s, key)
        except asyncio.CancelledError:
            self._perform(self.core.handle(Unsent(line.id, Unanswered.ABORTED), self.clock()))
            raise
        except BlobStoreUnavailable:
            log.warning("dispatcher.line_unreadable", line_id=line.id, batch_id=batch.id)
            self._perform(self.core.handle(Unsent(line.id, Unanswered.UNREADABLE), self.clock()))
        except Exception as exc:
            # Never strand the line: its lease would be renewed forever and the batch would never end.
            log.exception("dispatcher.line_crashed", line_id=line.id, batch_id=batch.id)
            self._perform(self.core.handle(Unsent(line.id, Unanswered.CRASHED, type(exc).__name__), self.clock()))
        finally:
            self._lines.pop(line.id, None)
            self._wake.set()

    async def _run_request(self, request: _Request) -> None:
        """Run the lines of one coalesced request (dispatch/coalesced.py) and tell the core, line by line, what each
        got — as `_run_line` does for one line. Lines the result cache holds are answered from it first."""
        first = request.starts[0]
        batch, backend = first.batch, self.backends[first.endpoint]
        started_lines = lines = [start.line for start in request.starts]
        try:
            raws = await read_lines(self.blobs, batch.input_blob_key, lines)
            bodies = [orjson.loads(raw)["body"] for raw in raws]
            keys = [await self.cache.key(batch, backend, body) for body in bodies]
            lines, bodies, keys = await self._answer_cached(request, backend.name, lines, bodies, keys)
            lines, bodies, keys = self._not_lapsing(lines, bodies, keys)
            if not lines:
                return
            left_s = batch.expires_at - self.clock() + self.settings.cancel_grace_s
            timeout = max(1.0, min(self.settings.request_timeout_s, left_s))
            self.metrics.in_flight.labels(backend.name).inc()
            started = self.clock()
            try:
                outcomes = await send_together(
                    backend, batch.endpoint, bodies, timeout, self._max_inputs.get(backend.name, _MAX_INPUTS)
                )
            finally:
                self.metrics.in_flight.labels(backend.name).dec()
            latency_s = max(0.0, self.clock() - started)
            self.metrics.backend_seconds.labels(backend.name).observe(latency_s)
            request.answered = True
            answered: collections.Counter[str] = collections.Counter()
            for line, outcome, key in zip(lines, outcomes, keys, strict=True):
                if line.id in request.aborted:
                    self._perform(self.core.handle(Unsent(line.id, Unanswered.ABORTED), self.clock()))
                    continue
                answered[outcome_label(outcome)] += 1
                self._answer(line, backend.name, outcome, latency_s, key)
            for label, count in answered.items():  # once a request: a counter's labels() costs more than a line
                self.metrics.backend_requests.labels(backend.name, label).inc(count)
        except asyncio.CancelledError:
            self._unsend(lines, Unanswered.ABORTED)
            raise
        except BlobStoreUnavailable:
            log.warning("dispatcher.line_unreadable", line_id=lines[0].id, batch_id=batch.id, lines=len(lines))
            self._unsend(lines, Unanswered.UNREADABLE)
        except Exception as exc:
            log.exception("dispatcher.line_crashed", line_id=lines[0].id, batch_id=batch.id, lines=len(lines))
            self._unsend(lines, Unanswered.CRASHED, type(exc).__name__)
        finally:
            for line in started_lines:
                self._lines.pop(line.id, None)
            self._wake.set()

    async def _answer_cached(
        self,
        request: _Request,
        backend: str,
        lines: list[LeasedLine],
        bodies: list[dict[str, Any]],
        keys: list[str | None],
    ) -> tuple[list[LeasedLine], list[dict[str, Any]], list[str | None]]:
        """Answer the lines of a coalesced request that the result cache holds; return the others, to be sent."""
        if not any(keys):  # the cache is off for the batch (the common case): nothing to look up
            return lines, bodies, keys
        batch = request.starts[0].batch
        unanswered: list[LeasedLine] = []
        unanswered_bodies: list[dict[str, Any]] = []
        unanswered_keys: list[str | None] = []
        for line, body, key in zip(lines, bodies, keys, strict=True):
            hit = await self.cache.lookup(batch, key) if key is not None else None
            if hit is None:
                unanswered.append(line)
                unanswered_bodies.append(body)
                unanswered_keys.append(key)
            elif line.id in request.aborted:
                self._perform(self.core.handle(Unsent(line.id, Unanswered.ABORTED), self.clock()))
            else:
                self._answer(line, backend, hit, 0.0, key)
        return unanswered, unanswered_bodies, unanswered_keys

    def _answer(
        self, line: LeasedLine, backend: str, outcome: Outcome, latency_s: float, cache_key: str | None = None
    ) -> None:
        """Tell the core what the line got; a success gets kept under `cache_key` (the result cache) with it."""
        actions = self.core.handle(Answered(line.id, outcome, latency_s), self.clock())
        if cache_key is not None and outcome.kind is OutcomeKind.SUCCESS:
            actions = [self.cache.keep(action, cache_key) for action in actions]
        for action in actions:
            if isinstance(action, Record) and action.update.is_final:
                self._lines_finished(action.update.state).inc()
            elif isinstance(action, Record) and action.update.attempts > line.attempts:
                self.metrics.line_retries.labels(backend).inc()  # not a hand-back in an outage
        self._perform(actions)

    def _lines_finished(self, state: RequestState) -> Counter:
        """The counter of lines that ended in `state`, looked up once: labels() takes a lock and builds a key."""
        counter = self._finished_counters.get(state)
        if counter is None:
            counter = self._finished_counters[state] = self.metrics.lines_finished.labels(state.value)
        return counter

    def _unsend(self, lines: Sequence[LeasedLine], why: Unanswered, message: str = "") -> None:
        """Lines of a request that got no answer: each still in flight with the core is told so (once)."""
        for line in lines:
            if line.id in self.core.flights:
                self._perform(self.core.handle(Unsent(line.id, why, message), self.clock()))

    async def _watch_batches(self, now: float) -> None:
        """Cancelling or expired batches among those this worker holds lines of: the core closes and aborts."""
        states = await self.store.batch_statuses(self.core.held_batches())
        self._perform(self.core.handle(BatchStates(states), now))

    async def _shutdown(self) -> None:
        """Hand back buffered lines at once; give lines in flight and batch housekeeping under way (a finalize)
        `shutdown_grace_s` to finish, then abort what is left (lines go back uncharged)."""
        if self._timer is not None:
            self._timer.cancel()
        self.endpoints.stop()
        self._perform(self.core.handle(Stop(), self.clock()))
        self.recorder.flush_soon()  # hand them back now: another worker may lease them during our grace
        lines = list(self._lines.values())
        running = lines + list(self.housekeeper.tasks)
        still: set[asyncio.Task[None]] = set()
        if running:
            _, still = await asyncio.wait(running, timeout=self.settings.shutdown_grace_s)
            self._perform(self.core.handle(GraceOver(), self.clock()))
            for task in still:
                task.cancel()  # tending tasks; lines were cancelled by GraceOver's aborts
            await asyncio.gather(*still, return_exceptions=True)
        aborted = sum(task in still for task in lines)
        log.info("dispatcher.stopped", owner=self.owner, in_flight=len(lines), aborted=aborted)
