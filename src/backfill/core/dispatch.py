"""The dispatch core: what to lease, what to start where, what to abort and what each line becomes. No I/O.

A state machine in the manner of h11: `handle(event, now)` takes one event (core/events.py) and returns the
actions it calls for. It holds, per worker, what is buffered (leased, not started), what is in flight and why a
line is being aborted; fair share, endpoint limits, preemption, the harvest controllers, off-peak windows,
promotion and the split of a harvested endpoint between workers live behind it. Time is an argument, randomness
(retry jitter) comes from the `rng` it is given.

Two drivers perform its actions: the asyncio dispatcher (dispatch/dispatcher.py) against the store, the blob
store and real backends, and the simulator (sim/virtual.py) against modelled engines in virtual time. Nothing
else decides any of this.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from backfill.config import Settings
from backfill.core.events import (
    Abort,
    AbortReason,
    Action,
    Answered,
    BatchesRead,
    BatchStates,
    Changed,
    EndpointChanged,
    EngineRead,
    Event,
    Fill,
    GraceOver,
    Grant,
    Lease,
    Leased,
    ModelLoading,
    Probe,
    Probed,
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
from backfill.core.harvest import Harvest
from backfill.core.pool import Endpoint, Pool, Start
from backfill.core.updates import closed, cut_by_window, line_update_after
from backfill.domain.batches import BatchStatus, RequestState, ScheduleState
from backfill.domain.endpoint_report import EndpointReport
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.policy.circuit import Circuit, CircuitState, due_probes, waiting_note
from backfill.policy.fair import FairScheduler, Scheduler
from backfill.policy.limits import EndpointLimits
from backfill.policy.retry import RetryPolicy


@dataclass
class Flight:
    """A line in flight; `abort` says why it is being stopped, once it is."""

    start: Start
    pool: Pool
    abort: AbortReason | None = None


class DispatchCore:
    def __init__(
        self,
        settings: Settings,
        endpoints: Sequence[tuple[Endpoint, Iterable[str]]],
        *,
        rng: random.Random | None = None,
        scheduler: type[Scheduler] = FairScheduler,
        promote: bool = True,
    ) -> None:
        """`endpoints`: each endpoint with the models it serves; a model served by several forms a pool.
        `scheduler` and `promote` (deadline promotion and completion estimates): backfill's policy by default;
        FIFO and EDF without promotion are the benchmarks' baselines."""
        self.settings = settings
        self.promote = promote
        self.rng = rng or random.Random()
        self.retry = RetryPolicy(settings.max_attempts, settings.retry_base_s, settings.retry_max_s)
        configured = {backend.name: backend for backend in settings.backends}
        by_model: dict[str, list[Endpoint]] = {}
        for endpoint, models in endpoints:
            for model in models:
                by_model.setdefault(model, []).append(endpoint)
        self.limits: dict[str, EndpointLimits] = {}  # by endpoint, shared by the pools it serves
        self.pools = {
            model: Pool.build(served, configured, preemption=settings.fair_share_preemption, shared=self.limits)
            for model, served in by_model.items()
        }
        for pool in self.pools.values():
            pool.scheduler = scheduler()
        self.harvest = Harvest(settings, self.limits, self.pools)
        # One circuit breaker per endpoint (policy/circuit.py): an endpoint that is down takes no lines, a pool's
        # other endpoints take them, and lines that failed with it are not charged.
        self.circuits = {name: Circuit(probe_max_s=settings.probe_max_s) for name in self.limits}
        self.loading: dict[str, float] = {}  # endpoint -> since when its in-process engine loads its model
        self.flights: dict[int, Flight] = {}
        self.batches: list[DispatchBatch] = []
        self.stopping = False
        self._batches_at = -float("inf")
        self._outlooks_at = -float("inf")
        self._dry: set[str] = set()  # batches with nothing leasable at the last look
        self._closing: dict[str, tuple[float, AbortReason]] = {}  # batch id -> (abort in flight at, why)
        self._mine: dict[str, float] = {}  # this worker's rate per model at the last outlook

    # --- queries ---------------------------------------------------------------------------------------------------

    def is_served(self, model: str) -> bool:
        return model in self.pools

    def poll_due(self, now: float) -> bool:
        """Time to read the dispatchable batches again (`BatchesRead`)."""
        return now - self._batches_at >= self.settings.poll_interval_s

    def held_batches(self) -> list[str]:
        """Batches this worker has lines of, in flight or buffered: their states are wanted (`BatchStates`)."""
        held = {flight.start.batch.id for flight in self.flights.values()}
        held |= {batch_id for pool in self.pools.values() for batch_id, lines in pool.ready.items() if lines}
        return sorted(held)

    def batch_token_counters(self) -> dict[str, int]:
        """This worker's batch-token counter per harvested endpoint, to publish for the other workers."""
        return self.harvest.counters()

    def batch_in_flight(self) -> dict[str, int]:
        """Batch lines this worker has in flight, per endpoint."""
        return {name: limits.in_flight for name, limits in self.limits.items()}

    def endpoint_reports(self) -> dict[str, EndpointReport]:
        """What this worker knows of each endpoint, for the dashboard (domain/endpoint_report.py)."""
        return {
            name: EndpointReport(
                in_flight=limits.in_flight,
                ceiling=self.harvest.ceilings.get(name),
                engine_waiting=self.harvest.waiting.get(name),
                up=self.circuits[name].state is CircuitState.CLOSED,
                ttft_baseline_s=self.harvest.ttft_baseline_s(name),
            )
            for name, limits in self.limits.items()
        }

    @property
    def harvesting(self) -> bool:
        return bool(self.harvest.harvested)

    def waiting_for(self, model: str) -> str | None:
        """What a batch of `model` waits for when no endpoint of its pool is up ("backend X unreachable since
        …: why"), or while every one is loading the model ("loading model M since …"); None otherwise."""
        held = self._held(model)
        return None if held is None else held[1]

    def _held(self, model: str) -> tuple[ScheduleState, str] | None:
        pool = self.pools.get(model)
        if pool is None:
            return None
        note = waiting_note({name: self.circuits[name] for name in pool.limits})
        if note is not None:
            return ScheduleState.WAITING, note
        loading = [self.loading.get(name) for name in pool.limits]
        if not loading or None in loading:
            return None
        since = datetime.fromtimestamp(min(s for s in loading if s is not None), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ScheduleState.LOADING, f"loading model {model} since {since}"

    # --- events ----------------------------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Fill():
                return self._probes(now) + self._fill()
            case Probed(endpoint, error):
                return self._probed(endpoint, error, now)
            case Leased(grants):
                return self._leased(grants, now)
            case Answered(line_id, outcome, latency_s):
                return self._answered(line_id, outcome, latency_s, now)
            case Unsent(line_id, why, message):
                return self._unsent(line_id, why, message, now)
            case BatchesRead(batches):
                return self._batches_read(batches, now)
            case RatesShared(rates):
                return self._rates_shared(rates, now)
            case Changed() | ModelLoading():
                return self._changed(event)
            case EngineRead(loads, ttft, others):
                ceilings, victims = self.harvest.read(now, loads, ttft, others)
                actions: list[Action] = [
                    SetCeiling(name, value, self.harvest.ttft_baseline_s(name)) for name, value in ceilings.items()
                ]
                return actions + self._abort(victims, AbortReason.SHED)
            case BatchStates(states):
                return self._batch_states(states, now)
            case Stop() | GraceOver():
                return self._shutdown(event)
        raise TypeError(f"not an event: {event!r}")

    def _changed(self, event: Changed | ModelLoading) -> list[Action]:
        if isinstance(event, Changed):
            self._batches_at = -float("inf")
        elif event.since is None:
            self.loading.pop(event.endpoint, None)
            self._outlooks_at = -float("inf")  # stop saying it at the next read of the batches
        else:
            self.loading[event.endpoint] = event.since
            self._outlooks_at = -float("inf")  # say it at the next read of the batches
        return []

    def _shutdown(self, event: Stop | GraceOver) -> list[Action]:
        """Stop: buffered lines go back at once; GraceOver: abort what is still in flight."""
        if isinstance(event, Stop):
            self.stopping = True
            return [Record(closed(line, RequestState.QUEUED)) for line in self._take_buffered()]
        return self._abort([flight.start for flight in self.flights.values()], AbortReason.SHUTDOWN)

    def _batches_read(self, batches: Sequence[DispatchBatch], now: float) -> list[Action]:
        self.batches = list(batches)
        self._batches_at = now
        self._dry.clear()
        for pool in self.pools.values():
            pool.prune()
        if not self.promote or now - self._outlooks_at < self.settings.outlook_interval_s:
            return []
        self._outlooks_at = now
        self._mine = {model: pool.measure(now) for model, pool in self.pools.items()}
        return [ShareRates(dict(self._mine))]

    def _rates_shared(self, rates: Mapping[str, float], now: float) -> list[Action]:
        """Completion estimates at the rate of every worker together (each publishes what it serves per model)."""
        rows: list[tuple[str, int | None, str | None]] = []
        waiting: dict[str, str] = {}
        for model, pool in self.pools.items():
            batches = [batch for batch in self.batches if batch.model == model]
            held = self._held(model)
            if held is None:
                rows += pool.outlooks(now, batches, max(rates.get(model, 0.0), self._mine.get(model, 0.0)))
                continue
            state, note = held
            rows += [(batch.id, None, state.value) for batch in batches]
            waiting |= {batch.id: note for batch in batches}
        return [ShowOutlooks(rows, waiting)]

    def _fill(self) -> list[Action]:
        """Lease lines for batches whose buffer is low (pool.lease_wanted)."""
        if self.stopping:
            return []
        active: dict[str, int] = {}
        for batch in self.batches:
            active[batch.model] = active.get(batch.model, 0) + 1
        leases: list[Action] = []
        for batch in self.batches:
            pool = self.pools.get(batch.model)
            if pool is None or batch.id in self._closing or batch.id in self._dry:
                continue
            want = pool.lease_wanted(batch.id, active[batch.model], pool.lines_per_request(batch.endpoint))
            if want > 0:
                leases.append(Lease(batch, want))
        return leases

    def _leased(self, grants: Sequence[Grant], now: float) -> list[Action]:
        for grant in grants:
            self.pools[grant.batch.model].add(grant.batch, list(grant.lines))
            if len(grant.lines) < grant.wanted:
                self._dry.add(grant.batch.id)  # look again at the next `BatchesRead`
        actions: list[Action] = []
        for pool in self.pools.values():
            actions += self._start_from(pool, now)
        return actions

    def _start_from(self, pool: Pool, now: float) -> list[Action]:
        actions: list[Action] = []
        while not self.stopping:
            start = pool.next_start(now)
            if isinstance(start, list):
                for one in start:
                    self.flights[one.line.id] = Flight(one, pool)
                actions += start
                continue
            if start != float("inf"):
                actions.append(WakeAt(start))
            else:
                # Every slot taken: hand back young lines of a tenant over its fair share (uncharged) so a short
                # tenant gets slots now.
                actions += self._abort(pool.preempt(now), AbortReason.PREEMPTED)
            break
        return actions

    def _abort(self, starts: Iterable[Start], reason: AbortReason) -> list[Action]:
        actions: list[Action] = []
        for start in starts:
            flight = self.flights.get(start.line.id)
            if flight is None or flight.abort is reason:
                continue
            if flight.abort is None or reason in (AbortReason.CANCELLED, AbortReason.EXPIRED):
                flight.abort = reason  # the batch ending outranks a hand-back
            actions.append(Abort(start.line.id, start.endpoint, reason))
        return actions

    def _answered(self, line_id: int, outcome: Outcome, latency_s: float, now: float) -> list[Action]:
        flight = self.flights.pop(line_id, None)
        if flight is None:
            return []
        start = flight.start
        if outcome.cached_from is not None:
            # Answered from the result cache: the endpoint did no work, so its limits, meters and circuit learn
            # nothing (its harvest accounting must not see tokens the engine never served).
            flight.pool.release(start)
            return [Record(line_update_after(self.retry, self.rng, start, outcome, now))]
        circuit = self.circuits[start.endpoint]
        was = circuit.state
        # A line cut off by its window says nothing about the endpoint (several often end at the same moment).
        if cut_by_window(start, outcome, now) or circuit.on_answer(line_id, outcome, now):
            flight.pool.finish(start, now, latency_s, outcome)
            actions: list[Action] = [Record(line_update_after(self.retry, self.rng, start, outcome, now))]
        else:
            # The endpoint failed, not the line: back to the queue uncharged, at once (another endpoint of the
            # pool may take it); its limits learn nothing from an outage.
            flight.pool.release(start)
            line = start.line
            update = LineUpdate(
                line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, line.attempts, now,
                error_message=outcome.message,
            )  # fmt: skip
            actions = [Record(update)]
        return actions + self._circuit_moved(start.endpoint, was, now)

    def _probes(self, now: float) -> list[Action]:
        """Probes due for endpoints that are down, and a wake-up for the next one."""
        due, later = due_probes(self.circuits, now)
        actions: list[Action] = [Probe(name) for name in due]
        return actions + ([WakeAt(later)] if later != float("inf") else [])

    def _probed(self, endpoint: str, error: str | None, now: float) -> list[Action]:
        circuit = self.circuits.get(endpoint)
        if circuit is None:
            return []
        was = circuit.state
        circuit.on_probe(error is None, error or "", now)
        return self._circuit_moved(endpoint, was, now)

    def _circuit_moved(self, endpoint: str, was: CircuitState, now: float) -> list[Action]:
        """What follows a change of an endpoint's circuit: its limits, the lines in flight there when it went down
        (aborted, handed back uncharged), lines starting where it came back; and the driver is told."""
        circuit = self.circuits[endpoint]
        if circuit.state is was:
            return []
        limits = self.limits[endpoint]
        limits.circuit_cap = circuit.cap
        self._outlooks_at = -float("inf")  # show batches waiting (or not) at the next read of the batches
        actions: list[Action] = [EndpointChanged(endpoint, circuit.state, circuit.since, circuit.last_error)]
        if circuit.state is CircuitState.OPEN:
            there = [flight.start for flight in self.flights.values() if flight.start.endpoint == endpoint]
            actions += self._abort(there, AbortReason.OUTAGE)
        else:
            if circuit.state is CircuitState.CLOSED:
                limits.restart()
            for pool in self.pools.values():
                if endpoint in pool.limits:
                    actions += self._start_from(pool, now)
        return actions

    def _unsent(self, line_id: int, why: Unanswered, message: str, now: float) -> list[Action]:
        flight = self.flights.pop(line_id, None)
        if flight is None:
            return []
        flight.pool.release(flight.start)
        line = flight.start.line
        if why is Unanswered.ABORTED:
            state = flight.abort.state if flight.abort is not None else RequestState.QUEUED
            update = closed(line, state)
            if flight.abort is AbortReason.OUTAGE:
                update = msgspec.structs.replace(
                    update, error_message=self.circuits[flight.start.endpoint].last_error or None
                )
            return [Record(update)]
        if why is Unanswered.UNREADABLE:
            # Nothing was sent (its body could not be read): back to the queue uncharged, a little later.
            retry_at = now + self.settings.retry_base_s * (1 + self.rng.random())
            return [
                Record(LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, line.attempts, retry_at))
            ]
        outcome = Outcome(OutcomeKind.UNAVAILABLE, message=f"Running the request failed: {message}")
        return [Record(line_update_after(self.retry, self.rng, flight.start, outcome, now))]

    def _batch_states(self, states: Mapping[str, tuple[BatchStatus, int]], now: float) -> list[Action]:
        """Stop work on batches that are cancelling or past their window: close buffered lines at once, abort the
        ones in flight once `cancel_grace_s` has passed."""
        for batch_id, (status, expires_at) in states.items():
            if status is BatchStatus.CANCELLING:
                reason = AbortReason.CANCELLED
            elif now >= expires_at or status.is_terminal:
                reason = AbortReason.EXPIRED
            else:
                continue
            self._closing.setdefault(batch_id, (now + self.settings.cancel_grace_s, reason))
        actions: list[Action] = []
        for batch_id, (when, reason) in list(self._closing.items()):
            for model, pool in self.pools.items():
                # Lines that waited for an endpoint to come back end with why it did not.
                note = self.waiting_for(model) if reason is AbortReason.EXPIRED else None
                actions += [
                    Record(msgspec.structs.replace(closed(line, reason.state), error_message=note))
                    for line in pool.take_batch(batch_id)
                ]
            flights = [flight.start for flight in self.flights.values() if flight.start.batch.id == batch_id]
            if not flights:
                del self._closing[batch_id]
            elif now >= when:
                actions += self._abort(flights, reason)
        return actions

    def _take_buffered(self) -> list[LeasedLine]:
        return [
            line for pool in self.pools.values() for batch_id in list(pool.ready) for line in pool.take_batch(batch_id)
        ]
