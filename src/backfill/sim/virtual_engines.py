"""Modelled engines for virtual time: an event loop whose clock jumps from event to event, and two engines.

- `IterationEngine`: the iteration-level `EngineModel` (continuous batching, KV blocks, prefix cache); exact,
  about one event per sequence per iteration — right for minutes to hours of load;
- `FluidEngine`: processor sharing of a capacity (line-cost units per second, see `policy.fair.line_cost`)
  that can vary over time (what interactive traffic leaves); one event per line — right for days.

`sim/virtual.py` drives the dispatch core over them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Protocol

from backfill.domain.engine_load import EngineLoad
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.policy.fair import line_cost
from backfill.sim.engine import EngineModel, SimRequest, StepResult, TokenEvent
from backfill.sim.profile import EngineProfile


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


Done = Callable[[float, Outcome], None]  # (finish time, what the endpoint answered)


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

    def load(self) -> EngineLoad | None:
        """What a scrape of the engine's /metrics would say now (None: it has none)."""
        ...


class IterationEngine:
    def __init__(self, loop: EventLoop, profile: EngineProfile) -> None:
        self.loop = loop
        self.model = EngineModel(profile)
        self._done: dict[str, tuple[Done, int, int]] = {}
        self._first: dict[str, Callable[[float], None]] = {}
        self._served: dict[str, Callable[[float, TokenEvent], None]] = {}
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
        served: Callable[[float, TokenEvent], None] | None = None,
    ) -> None:
        """As `VirtualEngine.submit`; `served`, if given, sees each of the request's iterations as it comes out
        (what a streaming client receives, when it receives it)."""
        request = SimRequest(line_id, prompt_tokens, prefix, output_tokens, priority=priority, arrival_s=self.loop.now)
        self.model.submit(request)
        self._done[line_id] = (done, prompt_tokens, output_tokens)
        self._submitted[line_id] = self.loop.now
        if first_token is not None:
            self._first[line_id] = first_token
        if served is not None:
            self._served[line_id] = served
        if not self._busy:
            self._busy = True
            self.loop.at(self.loop.now, self._step)

    def abort(self, line_id: str) -> None:
        self.model.abort(line_id)
        self._done.pop(line_id, None)
        self._first.pop(line_id, None)
        self._served.pop(line_id, None)
        self._submitted.pop(line_id, None)

    def load(self) -> EngineLoad:
        """What a scrape of a vLLM server's /metrics would say now."""
        totals = self.model.totals
        tokens = totals.prompt_tokens + totals.generation_tokens
        return EngineLoad(self.model.num_running, self.model.num_waiting, None, None, tokens=tokens)

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
            if self._served:
                served = self._served.get(event.request_id)
                if served is not None:
                    served(self.loop.now, event)
            if event.is_first_token:
                first = self._first.pop(event.request_id, None)
                if first is not None:
                    first(self.loop.now)
                submitted = self._submitted.pop(event.request_id)
                if self.on_first_token is not None:
                    self.on_first_token(self.loop.now - submitted)
            if event.finished:
                self._served.pop(event.request_id, None)
                done, prompt, output = self._done.pop(event.request_id)
                usage = Usage(input_tokens=prompt, cached_tokens=event.cached_tokens, output_tokens=output)
                done(self.loop.now, Outcome(OutcomeKind.SUCCESS, 200, usage=usage))
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
        self._lines: dict[str, tuple[Done, Outcome]] = {}
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
        usage = Usage(input_tokens=prompt_tokens, output_tokens=output_tokens)
        self._lines[line_id] = (done, Outcome(OutcomeKind.SUCCESS, 200, usage=usage))
        self._reschedule()

    def abort(self, line_id: str) -> None:
        self._advance()
        if self._lines.pop(line_id, None) is not None:
            self._aborted.add(line_id)
        self._reschedule()

    def load(self) -> EngineLoad | None:
        return None

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
            done, outcome = self._lines.pop(line_id)
            done(self.loop.now, outcome)
        self._reschedule()
