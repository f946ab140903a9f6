"""One pool per model: its endpoints with their limits, the lines leased for it, and its measured throughput.

The pool asks the policy what to start (`FairScheduler`, `pick_endpoint`) and keeps the books the policy needs;
it does no I/O. `DispatchCore` (core/dispatch.py) holds one per model.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from backfill.config import BackendSettings
from backfill.domain.batches import ScheduleState
from backfill.domain.coalescing import COALESCED_ENDPOINTS
from backfill.domain.estimates import expected_output_tokens
from backfill.domain.leases import DispatchBatch, LeasedLine
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage_report import Capacity
from backfill.policy.estimate import WorkItem, estimate_completions, outlook
from backfill.policy.fair import Candidate, FairScheduler, Scheduler, line_cost, share_gap
from backfill.policy.harvest import HarvestState
from backfill.policy.limits import EndpointLimits, is_overload
from backfill.policy.routing import next_start_at, pick_endpoint

# How big a request of coalesced lines (embeddings, moderations) may get on an in-process engine, which has no
# `[[backends]]` entry: the configured defaults.
_REQUEST_LINES = 32
_REQUEST_TOKENS = 16384
_FAST_HALF_LIFE_S = 30.0
_SLOW_HALF_LIFE_S = 3600.0


class Endpoint(Protocol):
    """What the pool needs to know of a backend: its name and, for an in-process engine, its exact capacity."""

    @property
    def name(self) -> str: ...

    @property
    def max_concurrency(self) -> int: ...


class Start(msgspec.Struct, frozen=True):
    """Send `line` of `batch` to `endpoint` now; `cost` is its fair-share price. `request`: when not 0, the line
    goes in one upstream request with the other lines of that `request` started at the same time (coalesced
    embeddings or moderations lines; they take one slot of the endpoint together)."""

    line: LeasedLine
    batch: DispatchBatch
    endpoint: str
    cost: float
    request: int = 0
    capacity: Capacity = Capacity.DEDICATED  # why it runs now (the usage report counts its tokens so)


@dataclass
class _Request:
    """Lines started together in one upstream request: the endpoint slot is theirs until the last one leaves."""

    endpoint: str
    open: int
    counted: int  # the prompt tokens `on_start` counted
    tokens: int = 0  # what the endpoint reported for the lines answered so far
    outcome: Outcome | None = None  # the answer the limits learn from (an overload one if any line had it)
    latency_s: float = 0.0
    answered_at: float = 0.0


@dataclass
class ThroughputMeter:
    """Line cost served per second while the pool had work, smoothed on two time scales.

    `rate` is the lower of a fast average (half-life 30 s: what the pool does now) and a slow one (half-life
    1 h: what it has done lately). Completion estimates use it, so they are conservative in both directions
    that matter: a sudden drop (interactive traffic arriving, an endpoint lost) shows within a minute, while a
    quiet spell (the night) does not promise its rate for the whole of a long window.
    """

    fast: float = 0.0
    slow: float = 0.0
    _served: float = 0.0
    _since: float | None = None

    @property
    def rate(self) -> float:
        return min(self.fast, self.slow) if self.slow > 0 else self.fast

    def add(self, cost: float) -> None:
        self._served += cost

    def sample(self, now: float, busy: bool) -> None:
        if self._since is None or not busy:
            self._since, self._served = now, 0.0
            return
        elapsed = now - self._since
        if elapsed <= 0:
            return
        instant = self._served / elapsed
        self.fast = _smooth(self.fast, instant, elapsed, _FAST_HALF_LIFE_S)
        self.slow = _smooth(self.slow, instant, elapsed, _SLOW_HALF_LIFE_S)
        self._since, self._served = now, 0.0


def _smooth(average: float, sample: float, elapsed_s: float, half_life_s: float) -> float:
    if average == 0.0:
        return sample
    keep: float = 0.5 ** (elapsed_s / half_life_s)
    return keep * average + (1 - keep) * sample


@dataclass
class Pool:
    limits: dict[str, EndpointLimits]  # endpoint name -> its limits (shared with other pools it serves)
    scheduler: Scheduler = field(default_factory=FairScheduler)
    ready: dict[str, deque[LeasedLine]] = field(default_factory=dict)  # batch id -> leased, not yet sent
    batches: dict[str, DispatchBatch] = field(default_factory=dict)
    promoted: set[str] = field(default_factory=set)
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)
    tenant_in_flight: dict[str, float] = field(default_factory=dict)  # line cost running, by tenant
    preemption: bool = True  # take young lines back from a tenant over its share for one short of it
    running: dict[int, tuple[Start, float]] = field(default_factory=dict)  # line id -> (start, when)
    preempting: set[int] = field(default_factory=set)  # line ids handed back, their slots not yet free
    harvest: dict[str, HarvestState] = field(default_factory=dict)  # harvested endpoints' states, for users
    # endpoint name -> the capacity batch lines use there now (core.harvest sets it; dedicated until then)
    capacity_of: dict[str, Capacity] = field(default_factory=dict)
    # endpoint name -> (lines, estimated tokens) one coalesced request may carry at most
    request_size: dict[str, tuple[int, int]] = field(default_factory=dict)
    requests: dict[int, _Request] = field(default_factory=dict)  # coalesced requests in flight, by id

    @classmethod
    def build(
        cls,
        endpoints: Iterable[Endpoint],
        configured: dict[str, BackendSettings],
        *,
        preemption: bool = True,
        shared: dict[str, EndpointLimits] | None = None,
    ) -> Pool:
        """A pool over `endpoints`; `shared` holds every endpoint's limits across pools (a backend that serves
        several models is one endpoint with one set of limits)."""
        shared = {} if shared is None else shared
        names = []
        sizes = {}
        for endpoint in endpoints:
            settings = configured.get(endpoint.name)
            if endpoint.name not in shared:
                shared[endpoint.name] = limits_for(endpoint, settings)
            names.append(endpoint.name)
            sizes[endpoint.name] = (
                (settings.max_inputs_per_request, settings.max_tokens_per_request)
                if settings is not None
                else (_REQUEST_LINES, _REQUEST_TOKENS)
            )
        return cls({name: shared[name] for name in names}, preemption=preemption, request_size=sizes)

    @property
    def capacity(self) -> int:
        """Lines the pool may have in flight now (adaptive limits included)."""
        return sum(limits.limit for limits in self.limits.values())

    @property
    def in_flight(self) -> int:
        return sum(limits.in_flight for limits in self.limits.values())

    @property
    def buffered(self) -> int:
        return sum(len(lines) for lines in self.ready.values())

    def lease_wanted(self, batch_id: str, active_batches: int, lines_per_slot: int = 1) -> int:
        """How many more lines of a batch to lease now (0: enough buffered).

        About two rounds of the pool's current capacity stay leased, shared out among its active batches, so a
        new batch finds lines of its own ready at the next free slot and no batch hoards the buffer; topped up
        once half is used, so leases go out in chunks rather than one statement per line. A slot takes
        `lines_per_slot` lines of a batch whose lines are coalesced (`lines_per_request`).
        """
        target = max(2, math.ceil(2 * self.capacity * lines_per_slot / max(active_batches, 1)))
        have = len(self.ready.get(batch_id, ()))
        return 0 if have > target // 2 else target - have

    def lines_per_request(self, endpoint: str) -> int:
        """How many lines of a batch of `endpoint` (the API path) one request may carry: the most any endpoint of
        the pool takes, for embeddings and moderations; else 1."""
        if endpoint not in COALESCED_ENDPOINTS:
            return 1
        return max((self.request_size.get(name, (_REQUEST_LINES, 0))[0] for name in self.limits), default=1)

    def add(self, batch: DispatchBatch, lines: list[LeasedLine]) -> None:
        self.batches[batch.id] = batch
        self.ready.setdefault(batch.id, deque()).extend(lines)

    def prune(self) -> None:
        """Forget batches with nothing buffered (finished, or dry until the next lease)."""
        for batch_id in [b for b, lines in self.ready.items() if not lines]:
            del self.ready[batch_id]
            self.batches.pop(batch_id, None)

    def take_batch(self, batch_id: str) -> list[LeasedLine]:
        """Remove every buffered line of a batch (cancelled, expired, or shutting down)."""
        return list(self.ready.pop(batch_id, ()))

    def next_start(self, now: float) -> list[Start] | float:
        """The line to start now and where (several lines of one batch, for one coalesced request); or, when
        nothing may start, the time to look again (inf: when a line finishes or more are leased)."""
        if not any(self.ready.values()):
            return math.inf
        # tokens/min buckets count tokens as providers do (prompt + output cap), not the scheduler's price
        typical = min(_tokens(lines[0]) for lines in self.ready.values() if lines)
        name = pick_endpoint(now, self.limits, typical)
        if name is None:
            return next_start_at(now, self.limits, typical)
        taken = {batch_id: self._request_lines(batch_id, name) for batch_id, lines in self.ready.items() if lines}
        candidates = [self._candidate(batch_id, taken[batch_id]) for batch_id in taken]
        chosen = self.scheduler.pick(candidates, self.tenant_in_flight)
        assert chosen is not None
        ready = self.ready[chosen.batch_id]
        lines = [ready.popleft() for _ in range(taken[chosen.batch_id])]
        self.limits[name].on_start(
            now, sum(_tokens(line) for line in lines), sum(line.est_prompt_tokens for line in lines)
        )
        self.tenant_in_flight[chosen.tenant_id] = self.tenant_in_flight.get(chosen.tenant_id, 0.0) + chosen.cost
        batch = self.batches[chosen.batch_id]
        capacity = Capacity.PROMOTED if batch.id in self.promoted else self.capacity_of.get(name, Capacity.DEDICATED)
        if len(lines) == 1:
            start = Start(lines[0], batch, name, chosen.cost, capacity=capacity)
            self.running[lines[0].id] = (start, now)
            return [start]
        request = lines[0].id + 1  # a line is in one request at a time: its id names it (never 0: "alone")
        self.requests[request] = _Request(name, len(lines), sum(line.est_prompt_tokens for line in lines))
        starts = [Start(line, batch, name, _line_cost(line), request, capacity) for line in lines]
        for start in starts:
            self.running[start.line.id] = (start, now)
        return starts

    def _request_lines(self, batch_id: str, endpoint: str) -> int:
        """How many of a batch's next lines go in one request to `endpoint`: 1, or for embeddings and moderations
        as many as its request size allows (domain/coalescing.py)."""
        if self.batches[batch_id].endpoint not in COALESCED_ENDPOINTS:
            return 1
        max_lines, max_tokens = self.request_size.get(endpoint, (_REQUEST_LINES, _REQUEST_TOKENS))
        ready = self.ready[batch_id]
        count, tokens = 1, ready[0].est_prompt_tokens
        while count < min(max_lines, len(ready)):
            tokens += ready[count].est_prompt_tokens
            if tokens > max_tokens:
                break
            count += 1
        return count

    def preempt(self, now: float) -> list[Start]:
        """Lines to hand back (uncharged) so that a tenant short of its fair share gets slots now, when every
        slot is taken: the youngest lines of the tenant furthest above its share, only those younger than a
        quarter of their endpoint's typical latency (little work is lost), no more than the gap.

        Without it a tenant that arrives while another holds every slot waits for slots to free one by one;
        with long lines that is most of its completion time.
        """
        if not self.preemption:
            return []
        held = dict(self.tenant_in_flight)
        for line_id in self.preempting:
            start = self.running[line_id][0]
            held[start.batch.tenant_id] = held.get(start.batch.tenant_id, 0.0) - start.cost
        candidates = [self._candidate(batch_id) for batch_id, lines in self.ready.items() if lines]
        gap = share_gap(candidates, held)
        if gap is None:
            return []
        waiting = sum(
            len(lines)
            for batch_id, lines in self.ready.items()
            if self.batches[batch_id].tenant_id == gap.owed.tenant_id
        )
        young = sorted(
            (
                (started, start)
                for line_id, (start, started) in self.running.items()
                if line_id not in self.preempting
                and not start.request  # coalesced lines are short, and one alone frees no slot
                and start.batch.tenant_id == gap.over_tenant
                and now - started < 0.25 * self.limits[start.endpoint].typical_latency_s
            ),
            key=lambda item: -item[0],
        )
        victims: list[Start] = []
        freed = 0.0
        for _, start in young:
            if freed + gap.owed.cost > gap.short or len(victims) >= waiting:
                break
            victims.append(start)
            freed += start.cost
            self.preempting.add(start.line.id)
        return victims

    def shed(self, now: float, max_age_s: float = math.inf) -> list[Start]:
        """Lines to hand back (uncharged) because an endpoint's harvest ceiling fell below what it has in flight
        (the harvest controller cut it): the newest on that endpoint first, the ones that have done least work, and
        none older than `max_age_s` — those have had their prompt processed, the bulk of a line's cost, and
        finishing them costs the engine less than doing that again later."""
        victims: list[Start] = []
        for name, limits in self.limits.items():
            if limits.ceiling is None:
                continue
            slots: dict[int, tuple[float, list[Start]]] = {}  # a coalesced request's lines share one slot
            for line_id, (start, started) in self.running.items():
                if start.endpoint == name and line_id not in self.preempting:
                    slots.setdefault(start.request or -line_id, (started, []))[1].append(start)
            excess = len(slots) - limits.ceiling
            if excess <= 0:
                continue
            for started, starts in sorted(slots.values(), key=lambda item: -item[0])[:excess]:
                if now - started > max_age_s:
                    break
                for start in starts:
                    self.preempting.add(start.line.id)
                    victims.append(start)
        return victims

    def finish(self, start: Start, now: float, latency_s: float, outcome: Outcome) -> None:
        """The endpoint answered (whatever it said)."""
        usage = outcome.usage
        if outcome.kind is OutcomeKind.SUCCESS:
            self.meter.add(line_cost(usage.input_tokens, usage.output_tokens))
        request = self.requests.get(start.request) if start.request else None
        if request is None:
            self.limits[start.endpoint].on_finish(
                now, latency_s, outcome, usage.input_tokens + usage.output_tokens, start.line.est_prompt_tokens
            )
        else:
            request.tokens += usage.input_tokens + usage.output_tokens
            if request.outcome is None or is_overload(outcome):
                request.outcome = outcome
            request.latency_s = max(request.latency_s, latency_s)
            request.answered_at = now
            self._leave_request(start.request, request)
        self._leave(start)

    def release(self, start: Start) -> None:
        """The line never got an answer (aborted, or crashed before sending): its slot goes back."""
        request = self.requests.get(start.request) if start.request else None
        if request is None:
            self.limits[start.endpoint].release(start.line.est_prompt_tokens)
        else:
            self._leave_request(start.request, request)
        self._leave(start)

    def _leave_request(self, request_id: int, request: _Request) -> None:
        """One line of a coalesced request is done; the last one frees the request's slot, as one request."""
        request.open -= 1
        if request.open > 0:
            return
        del self.requests[request_id]
        limits = self.limits[request.endpoint]
        if request.outcome is None:
            limits.release(request.counted)
        else:
            limits.on_finish(request.answered_at, request.latency_s, request.outcome, request.tokens, request.counted)

    def _leave(self, start: Start) -> None:
        self.running.pop(start.line.id, None)
        self.preempting.discard(start.line.id)
        tenant = start.batch.tenant_id
        left = self.tenant_in_flight.get(tenant, 0.0) - start.cost
        if left > 1e-6:
            self.tenant_in_flight[tenant] = left
        else:
            self.tenant_in_flight.pop(tenant, None)

    def _candidate(self, batch_id: str, count: int = 1) -> Candidate:
        """The batch's next `count` lines (one request) as a candidate for the scheduler: priced together."""
        batch = self.batches[batch_id]
        ready = self.ready[batch_id]
        cost = sum(_line_cost(ready[i]) for i in range(count)) if count > 1 else _line_cost(ready[0])
        return Candidate(
            batch_id, batch.tenant_id, float(batch.expires_at), cost, batch.weight, batch_id in self.promoted, batch.seq
        )

    def measure(self, now: float) -> float:
        """The line cost per second this process serves from the pool: its share of the pool's rate."""
        self.meter.sample(now, busy=self.in_flight > 0)
        return self.meter.rate

    def outlooks(
        self, now: float, batches: Iterable[DispatchBatch], rate: float | None = None
    ) -> list[tuple[str, int | None, str | None]]:
        """Re-estimate every batch of this pool; remember which are promoted; return what to show users.

        `rate`: the line cost per second the pool serves, every worker process together (several workers share
        the batches, so one worker's own rate would put every estimate that many times too late); this
        process's own measurement when None.
        """
        mine = list(batches)
        if rate is None:
            rate = self.measure(now)
        if rate <= 0 or not mine:
            self.promoted.clear()
            # No estimate without a measured rate; but a batch held back by interactive traffic says so.
            held = self._capacity_state()
            say = None if held is ScheduleState.ON_TRACK else held.value
            return [(batch.id, None, say) for batch in mine]
        items = [
            WorkItem(
                batch.id, batch.tenant_id, float(batch.expires_at), _remaining_cost(batch), batch.weight, batch.seq
            )
            for batch in mine
        ]
        etas = estimate_completions(now, items, rate)
        shown: list[tuple[str, int | None, str | None]] = []
        self.promoted.clear()
        for batch, item in zip(mine, items, strict=True):
            view = outlook(etas[batch.id], float(batch.expires_at), batch.window_s, now + item.remaining_cost / rate)
            state = self._capacity_state()
            if view.at_risk:
                state = ScheduleState.AT_RISK
            elif view.promoted:
                state = ScheduleState.PROMOTED
            if view.promoted:
                self.promoted.add(batch.id)
            eta = etas[batch.id]
            shown.append((batch.id, math.ceil(eta) if math.isfinite(eta) else None, state.value))
        return shown

    def _capacity_state(self) -> ScheduleState:
        """On track, or, when every endpoint of the pool is shared with interactive traffic, how that goes."""
        if not self.harvest or len(self.harvest) < len(self.limits):
            return ScheduleState.ON_TRACK
        states = set(self.harvest.values())
        if HarvestState.HARVESTING in states:
            return ScheduleState.HARVESTING
        if HarvestState.BLIND in states:
            return ScheduleState.HARVESTING_BLIND
        if HarvestState.OFF_PEAK_CAP in states:
            return ScheduleState.OFF_PEAK
        return ScheduleState.THROTTLED


def limits_for(endpoint: Endpoint, configured: BackendSettings | None) -> EndpointLimits:
    if configured is None:  # in-process engines know their exact capacity
        return EndpointLimits(endpoint.max_concurrency, adaptive=False)
    return EndpointLimits(
        configured.max_concurrency,
        rpm=configured.rpm,
        tpm=configured.tpm,
        adaptive=configured.adaptive_concurrency,
        initial_concurrency=min(configured.initial_concurrency, configured.max_concurrency),
        # A shared endpoint takes no batch line before its harvest controller's first reading (dispatch/watcher.py):
        # a worker starting with a backlog would otherwise send its whole adaptive limit into an engine whose
        # interactive load it has not yet read.
        ceiling=0 if configured.harvest is True else None,
    )


def _line_cost(line: LeasedLine) -> float:
    return line_cost(line.est_prompt_tokens, expected_output_tokens(line.max_output_tokens))


def _tokens(line: LeasedLine) -> int:
    return line.est_prompt_tokens + expected_output_tokens(line.max_output_tokens)


def _remaining_cost(batch: DispatchBatch) -> float:
    if batch.total <= 0:
        return 0.0
    per_line = line_cost(batch.est_prompt_tokens / batch.total, batch.est_output_tokens / batch.total)
    return per_line * batch.open_lines
