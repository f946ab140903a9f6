"""Virtual time: the dispatcher's own policy objects driven by modelled engines, so days of load run in seconds.

`VirtualDispatcher` does what `dispatch.Dispatcher` does — lease lines into a `Pool`, ask the pool what to start
and where, report finishes to the endpoint limits and the throughput meter, refresh outlooks (promotion) every
5 s — with the same `Pool`, `FairScheduler`, `EndpointLimits` and estimates, but no database, no HTTP and a
clock that jumps from event to event. Two engine models:

- `IterationEngine`: the iteration-level `EngineModel` (continuous batching, KV blocks, prefix cache); exact,
  about one event per sequence per iteration — right for minutes to hours of load;
- `FluidEngine`: processor sharing of a capacity (line-cost units per second, see `policy.fair.line_cost`)
  that can vary over time (what interactive traffic leaves); one event per line — right for days.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backfill.dispatch.pools import Pool, Start
from backfill.domain.leases import DispatchBatch, LeasedLine
from backfill.domain.lines import ValidLine, group_by_prefix
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.policy.fair import FairScheduler, Scheduler, line_cost
from backfill.policy.harvest import HarvestController, Signals
from backfill.policy.limits import EndpointLimits
from backfill.sim.engine import EngineModel, SimRequest, StepResult
from backfill.sim.profile import EngineProfile

OUTLOOK_EVERY_S = 5.0
PROBE_EVERY_S = 1.0


class EventLoop:
    """A heap of (time, callback); `run` pops them in time order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), callback))

    def run(self, until: float = math.inf, stop: Callable[[], bool] = lambda: False) -> None:
        while self._heap and self._heap[0][0] <= until and not stop():
            self.now, _, callback = heapq.heappop(self._heap)
            callback()


Done = Callable[[float, Usage], None]  # (finish time, usage)


class VirtualEngine(Protocol):
    def submit(
        self,
        line_id: str,
        prompt_tokens: int,
        output_tokens: int,
        prefix: tuple[int, ...],
        done: Done,
        *,
        priority: int = 0,
        first_token: Callable[[float], None] | None = None,
    ) -> None:
        """Start a request now; `done` is called at its modelled finish, `first_token` (where the model knows
        it) when its first output token comes out; `priority` orders admission under a "priority" profile."""
        ...

    def abort(self, line_id: str) -> None:
        """Drop a request (its client went away): `done` is never called."""
        ...


class IterationEngine:
    def __init__(self, loop: EventLoop, profile: EngineProfile) -> None:
        self.loop = loop
        self.model = EngineModel(profile)
        self._done: dict[str, tuple[Done, int, int]] = {}
        self._first: dict[str, Callable[[float], None]] = {}
        self._submitted: dict[str, float] = {}
        self._busy = False
        self.on_first_token: Callable[[float], None] | None = None  # every request's TTFT, as vLLM's histogram

    def submit(
        self,
        line_id: str,
        prompt_tokens: int,
        output_tokens: int,
        prefix: tuple[int, ...],
        done: Done,
        *,
        priority: int = 0,
        first_token: Callable[[float], None] | None = None,
    ) -> None:
        request = SimRequest(line_id, prompt_tokens, prefix, output_tokens, priority=priority, arrival_s=self.loop.now)
        self.model.submit(request)
        self._done[line_id] = (done, prompt_tokens, output_tokens)
        self._submitted[line_id] = self.loop.now
        if first_token is not None:
            self._first[line_id] = first_token
        if not self._busy:
            self._busy = True
            self.loop.at(self.loop.now, self._step)

    def abort(self, line_id: str) -> None:
        self.model.abort(line_id)
        self._done.pop(line_id, None)
        self._first.pop(line_id, None)
        self._submitted.pop(line_id, None)

    def waiting(self) -> int:
        """What a vLLM server reports as `vllm:num_requests_waiting`."""
        return self.model.num_waiting

    def _step(self) -> None:
        result = self.model.step()
        if result is None:
            self._busy = False
            return
        self.loop.at(self.loop.now + result.duration_s, lambda: self._finish(result))

    def _finish(self, result: StepResult) -> None:
        for event in result.events:
            if event.request_id not in self._done:
                continue  # aborted while this iteration ran
            if event.is_first_token:
                first = self._first.pop(event.request_id, None)
                if first is not None:
                    first(self.loop.now)
                submitted = self._submitted.pop(event.request_id)
                if self.on_first_token is not None:
                    self.on_first_token(self.loop.now - submitted)
            if event.finished:
                done, prompt, output = self._done.pop(event.request_id)
                done(self.loop.now, Usage(input_tokens=prompt, cached_tokens=event.cached_tokens, output_tokens=output))
        self._step()


class FluidEngine:
    """Lines in flight share `capacity(t)` equally (processor sharing). Capacity is piecewise constant between
    `change_every_s` boundaries, so finish times are exact within each piece."""

    def __init__(self, loop: EventLoop, capacity: Callable[[float], float], change_every_s: float = 60.0) -> None:
        self.loop = loop
        self.capacity = capacity
        self.change_every_s = change_every_s
        self.served = 0.0  # work done per line in flight since the start (the virtual-work clock)
        self._updated = 0.0
        self._rate = capacity(0.0)
        self._heap: list[tuple[float, int, str]] = []  # (served at which it finishes, tiebreak, line id)
        self._lines: dict[str, tuple[Done, Usage]] = {}
        self._aborted: set[str] = set()  # still in the heap, skipped when they come up
        self._seq = itertools.count()
        self._generation = 0
        self.busy_work = 0.0  # work units served, in total
        loop.at(change_every_s, self._capacity_changes)

    def submit(
        self,
        line_id: str,
        prompt_tokens: int,
        output_tokens: int,
        prefix: tuple[int, ...],
        done: Done,
        *,
        priority: int = 0,
        first_token: Callable[[float], None] | None = None,
    ) -> None:
        self._advance()
        cost = line_cost(prompt_tokens, output_tokens)
        heapq.heappush(self._heap, (self.served + cost, next(self._seq), line_id))
        self._lines[line_id] = (done, Usage(input_tokens=prompt_tokens, output_tokens=output_tokens))
        self._reschedule()

    def abort(self, line_id: str) -> None:
        self._advance()
        if self._lines.pop(line_id, None) is not None:
            self._aborted.add(line_id)
        self._reschedule()

    def _sharing(self) -> int:
        return len(self._heap) - len(self._aborted)

    def _advance(self) -> None:
        now = self.loop.now
        if self._sharing() > 0 and now > self._updated:
            share = self._rate / self._sharing()
            self.served += (now - self._updated) * share
            self.busy_work += (now - self._updated) * self._rate
        self._updated = now

    def _capacity_changes(self) -> None:
        self._advance()
        self._rate = max(0.0, self.capacity(self.loop.now))
        self._reschedule()
        self.loop.at(self.loop.now + self.change_every_s, self._capacity_changes)

    def _reschedule(self) -> None:
        self._generation += 1
        while self._heap and self._heap[0][2] in self._aborted:
            self._aborted.discard(heapq.heappop(self._heap)[2])
        if not self._heap or self._rate <= 0:
            return
        generation = self._generation
        left = max(0.0, self._heap[0][0] - self.served)
        self.loop.at(self.loop.now + left * self._sharing() / self._rate, lambda: self._finish(generation))

    def _finish(self, generation: int) -> None:
        if generation != self._generation:
            return  # superseded by a later start, finish or capacity change
        self._advance()
        while self._heap and self._heap[0][0] <= self.served + 1e-6:
            _, _, line_id = heapq.heappop(self._heap)
            if line_id in self._aborted:
                self._aborted.discard(line_id)
                continue
            done, usage = self._lines.pop(line_id)
            done(self.loop.now, usage)
        self._reschedule()


@dataclass(frozen=True, slots=True)
class LineSpec:
    prompt_tokens: int
    output_tokens: int
    prefix_blocks: tuple[int, ...] = ()
    prefix_key: int = 0  # lines with equal keys share a prompt prefix (0: none)


@dataclass
class BatchSpec:
    id: str
    tenant: str
    arrival_s: float
    window_s: float
    lines: list[LineSpec]
    weight: float = 1.0


@dataclass
class BatchRun:
    spec: BatchSpec
    seq: int
    queue: deque[tuple[int, LineSpec]]  # line number and line, in lease order
    open_lines: int
    est_prompt: int
    est_output: int
    finished_s: float | None = None

    @property
    def deadline_s(self) -> float:
        return self.spec.arrival_s + self.spec.window_s

    @property
    def missed(self) -> bool:
        return self.finished_s is None or self.finished_s > self.deadline_s


class _VirtualBackend:
    """What `Pool` hands back in a `Start`: a name; requests go to the engine, never through `send`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.models = frozenset({"sim"})
        self.max_concurrency = 0

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        raise RuntimeError("virtual endpoints are driven by the event loop")

    async def close(self) -> None:
        return None


@dataclass
class VirtualDispatcher:
    loop: EventLoop
    engines: dict[str, VirtualEngine]
    limits: dict[str, EndpointLimits]
    scheduler: Scheduler = field(default_factory=FairScheduler)
    group_prefixes: bool = True
    promote: bool = True
    preempt: bool = True
    engine_metrics: bool = True  # read the engine's queue (IterationEngine only), as for a vLLM backend
    runs: dict[str, BatchRun] = field(default_factory=dict)
    lines_done: int = 0
    output_tokens: int = 0
    last_done_s: float = 0.0
    preempted: int = 0
    on_batch_done: Callable[[BatchRun], None] | None = None
    batch_priority: int = 0  # sent with every line (a "priority" engine admits lower values first)
    # Harvesting (policy/harvest.py): a controller per endpoint, fed `signals(endpoint)` every probe.
    harvest: dict[str, HarvestController] = field(default_factory=dict)
    signals: Callable[[str], Signals] | None = None
    batch_tokens: int = 0  # prompt + output tokens of finished lines
    shed: int = 0  # lines handed back because a harvest limit fell below what was in flight

    def __post_init__(self) -> None:
        backends = {name: _VirtualBackend(name) for name in self.engines}
        self.pool = Pool(dict(backends), self.limits, self.scheduler, preemption=self.preempt)
        self._line_ids = itertools.count(1)
        self._specs: dict[int, LineSpec] = {}  # leased, not started
        self._running_specs: dict[int, LineSpec] = {}
        self._started: dict[int, float] = {}
        self._pumping = False
        self._wake_at = math.inf
        self._outlooks_armed = False
        self._probing = False

    def submit_at(self, spec: BatchSpec) -> None:
        self.loop.at(spec.arrival_s, lambda: self._arrive(spec))

    def _arrive(self, spec: BatchSpec) -> None:
        numbered = list(enumerate(spec.lines, start=1))
        if self.group_prefixes:
            valid = [ValidLine(n, "", 0, 0, 0, prefix_key=line.prefix_key) for n, line in numbered]
            groups = {v.number: v.prefix_group for v in group_by_prefix(valid)}
            numbered.sort(key=lambda item: (groups[item[0]], item[0]))
        self.runs[spec.id] = BatchRun(
            spec,
            len(self.runs),
            deque(numbered),
            len(spec.lines),
            sum(line.prompt_tokens for line in spec.lines),
            sum(line.output_tokens for line in spec.lines),
        )
        if self.promote and not self._outlooks_armed:
            self._outlooks_armed = True
            self.loop.at(self.loop.now + OUTLOOK_EVERY_S, self._outlooks)
        if (self.engine_metrics or self.harvest) and not self._probing:
            self._probing = True
            self.loop.at(self.loop.now + PROBE_EVERY_S, self._probe)
        self._pump()

    def _view(self, run: BatchRun) -> DispatchBatch:
        spec = run.spec
        return DispatchBatch(
            spec.id,
            spec.tenant,
            "sim",
            "/v1/chat/completions",
            math.ceil(run.deadline_s),
            "",
            math.floor(spec.arrival_s),
            run.seq,
            spec.weight,
            run.open_lines,
            run.est_prompt,
            run.est_output,
            len(spec.lines),
        )

    def _pump(self) -> None:
        if self._pumping:
            return  # a finish reported while starting: the running pump picks it up
        self._pumping = True
        try:
            active = [run for run in self.runs.values() if run.queue or self.pool.ready.get(run.spec.id)]
            for run in sorted(active, key=lambda r: (r.deadline_s, r.seq)):
                want = self.pool.lease_wanted(run.spec.id, len(active))
                lines = [self._lease(run) for _ in range(min(want, len(run.queue)))]
                if lines:
                    self.pool.add(self._view(run), lines)
            while True:
                start = self.pool.next_start(self.loop.now)
                if isinstance(start, Start):
                    self._run(start)
                    continue
                if math.isfinite(start):
                    if start < self._wake_at:
                        self._wake_at = start
                        self.loop.at(start, self._woken)
                    break
                victims = self.pool.preempt(self.loop.now)
                if not victims:
                    break
                for victim in victims:
                    self._hand_back(victim)
        finally:
            self._pumping = False

    def _woken(self) -> None:
        self._wake_at = math.inf
        self._pump()

    def _lease(self, run: BatchRun) -> LeasedLine:
        number, line = run.queue.popleft()
        line_id = next(self._line_ids)
        self._specs[line_id] = line
        return LeasedLine(line_id, run.spec.id, number, "", 0, 0, 0, 1, line.prompt_tokens, line.output_tokens)

    def _hand_back(self, start: Start) -> None:
        """Abort a running line and put it back at the head of its batch's queue, uncharged."""
        self.engines[start.backend.name].abort(f"l{start.line.id}")
        self.pool.release(start)
        line = self._running_specs.pop(start.line.id)
        self.runs[start.batch.id].queue.appendleft((start.line.line_no, line))
        self.preempted += 1

    def _run(self, start: Start) -> None:
        line = self._specs.pop(start.line.id)
        self._running_specs[start.line.id] = line
        name = start.backend.name
        started = self.loop.now

        def done(now: float, usage: Usage) -> None:
            self._running_specs.pop(start.line.id, None)
            self.pool.finish(start, now, now - started, Outcome(OutcomeKind.SUCCESS, 200, usage=usage))
            self.lines_done += 1
            self.last_done_s = now
            self.output_tokens += usage.output_tokens
            self.batch_tokens += usage.input_tokens + usage.output_tokens
            run = self.runs[start.batch.id]
            run.open_lines -= 1
            if run.open_lines == 0:
                run.finished_s = now
                if self.on_batch_done is not None:
                    self.on_batch_done(run)
            self._pump()

        self.engines[name].submit(
            f"l{start.line.id}", line.prompt_tokens, line.output_tokens, line.prefix_blocks, done,
            priority=self.batch_priority,
        )  # fmt: skip

    def _probe(self) -> None:
        """Read each engine's queue about once a second, as the dispatcher scrapes vLLM's /metrics."""
        if not any(run.open_lines for run in self.runs.values()):
            self._probing = False
            return
        for name, engine in self.engines.items():
            if self.engine_metrics and isinstance(engine, IterationEngine):
                self.pool.limits[name].on_engine_load(self.loop.now, engine.waiting())
        if self.harvest:
            self._harvest()
        self._pump()
        self.loop.at(self.loop.now + PROBE_EVERY_S, self._probe)

    def _harvest(self) -> None:
        """Each endpoint's harvest controller sets its limit; lines above a cut limit go back, newest first."""
        assert self.signals is not None
        shedding, age = False, math.inf
        for name, controller in self.harvest.items():
            limits = self.pool.limits[name]
            signals = self.signals(name)
            age = min(age, controller.shed_age_s)  # computed before the tick clears a cut's samples
            limits.ceiling = controller.tick(self.loop.now, signals)
            shedding = shedding or controller.shed
        for victim in self.pool.shed(self.loop.now, age) if shedding else ():
            self._hand_back(victim)
            self.shed += 1

    def _outlooks(self) -> None:
        """Every 5 s while there is work, as the dispatcher does; stops when idle so a run can end."""
        now = self.loop.now
        views = [self._view(run) for run in self.runs.values() if run.open_lines > 0]
        if not views:
            self._outlooks_armed = False
            return
        self.pool.outlooks(now, views)
        self._pump()
        self.loop.at(now + OUTLOOK_EVERY_S, self._outlooks)


def missed(runs: Sequence[BatchRun]) -> list[BatchRun]:
    return [run for run in runs if run.missed]
