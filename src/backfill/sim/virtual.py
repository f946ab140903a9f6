"""Virtual time: the production dispatch core (core/dispatch.py) driven over modelled engines, so days of load
run in seconds.

`VirtualDriver` performs the core's actions as the asyncio dispatcher does — lease lines, start them on an
endpoint, abort and hand back, record — against an in-memory line queue and modelled engines, with a clock that
jumps from event to event, and feeds the results back: the same events at the same cadences (batches read every
`poll_interval_s`, engine readings every `engine_metrics_interval_s`) from the same `Settings`. Every decision
(what to lease and start where, fair share, limits, preemption, harvest, off-peak, promotion) is the core's.
The engines and the event loop are in `sim/virtual_engines.py`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backfill.backends.engine_metrics import METRIC_NAMES
from backfill.config import BackendSettings, Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import (
    Abort,
    Action,
    Answered,
    BatchesRead,
    BatchStates,
    Changed,
    EndpointChanged,
    EngineRead,
    Fill,
    Grant,
    Lease,
    Leased,
    Probe,
    Probed,
    RatesShared,
    Record,
    SetCeiling,
    ShareRates,
    ShowOutlooks,
    Unanswered,
    Unsent,
    WakeAt,
)
from backfill.core.pool import Start
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.estimates import expected_output_tokens
from backfill.domain.leases import DispatchBatch, LeasedLine
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.domain.valid_lines import ValidLine, group_by_prefix
from backfill.policy.fair import FairScheduler, Scheduler
from backfill.sim.virtual_engines import EventLoop, VirtualEngine


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
class Queued:
    """A line waiting in the virtual store's queue."""

    id: int
    number: int
    spec: LineSpec
    prefix_group: int = 0
    attempts: int = 0
    not_before: float = 0.0  # a retry waits until then


@dataclass
class BatchRun:
    spec: BatchSpec
    seq: int
    queue: deque[Queued]  # in lease order (prefix group, then line number)
    open_lines: int
    est_prompt: int
    est_output: int
    finished_s: float | None = None
    status: BatchStatus = BatchStatus.IN_PROGRESS
    failed: int = 0  # lines that ended failed, cancelled or expired
    expired: int = 0  # lines that ran out of window

    @property
    def deadline_s(self) -> float:
        return self.spec.arrival_s + self.spec.window_s

    @property
    def missed(self) -> bool:
        return self.finished_s is None or self.finished_s > self.deadline_s


class VirtualDriver:
    """Drives `DispatchCore` over modelled engines in virtual time (see the module docstring).

    `settings.backends` names the endpoints (one per engine, serving the model "sim") with their limits, harvest
    and priority settings, exactly as a config file would. `interactive_ttft(endpoint)`: the proxy's TTFT samples
    since the last reading, for harvested endpoints (None: interactive traffic bypasses the proxy).
    `probe_phase_s`: how long after the first batch arrives the engines are first read (then every
    `engine_metrics_interval_s`); on the real path the watcher's readings fall anywhere relative to the workload.
    """

    MODEL = "sim"

    def __init__(
        self,
        loop: EventLoop,
        engines: dict[str, VirtualEngine],
        settings: Settings,
        *,
        scheduler: type[Scheduler] = FairScheduler,
        promote: bool = True,
        group_prefixes: bool = True,
        interactive_ttft: Callable[[str], list[float]] | None = None,
        seed: int = 0,
        core: DispatchCore | None = None,
        probe_phase_s: float = 0.0,
    ) -> None:
        self.loop = loop
        self.probe_phase_s = probe_phase_s
        self.engines = engines
        self.settings = settings
        self.group_prefixes = group_prefixes
        self.interactive_ttft = interactive_ttft
        configured = {cfg.name: cfg for cfg in settings.backends}
        missing = set(engines) - set(configured)
        if missing:
            raise ValueError(f"every engine needs a [[backends]] entry; none for {sorted(missing)}")
        self.core = core or DispatchCore(
            settings,
            [(_Endpoint(name, configured[name].max_concurrency), [self.MODEL]) for name in engines],
            rng=random.Random(seed),
            scheduler=scheduler,
            promote=promote,
        )
        self._priority = {name: _batch_priority(configured[name]) for name in engines}
        self._scraped = [name for name in engines if configured[name].flavour in METRIC_NAMES]
        self.runs: dict[str, BatchRun] = {}
        self.outlooks: list[tuple[str, int | None, str | None]] = []
        self.ceilings: dict[str, int] = {}
        self.lines_done = 0
        self.output_tokens = 0
        self.batch_tokens = 0  # prompt + output tokens of lines that succeeded
        self.last_done_s = 0.0
        self.preempted = 0  # lines handed back for fair share
        self.shed = 0  # lines handed back because a harvest ceiling fell below what was in flight
        self.on_batch_done: Callable[[BatchRun], None] | None = None
        self._ids = itertools.count(1)
        self._leases = itertools.count(1)
        self._leased: dict[int, tuple[BatchRun, Queued]] = {}
        self._requests: dict[int, str] = {}  # line id -> the engine's request id of its attempt in flight
        self._pumping = False
        self._wake_at = math.inf
        self._polling = False
        self._probing = False
        self._down: set[str] = set()  # endpoints in a modelled outage (`take_down`)
        self._sent_to: dict[int, str] = {}  # line id -> the endpoint its attempt in flight went to
        self.endpoint_changes: list[tuple[float, EndpointChanged]] = []  # what the core said, when

    # --- the workload --------------------------------------------------------------------------------------------

    def submit_at(self, spec: BatchSpec) -> None:
        self.loop.at(spec.arrival_s, lambda: self._arrive(spec))

    def cancel_at(self, batch_id: str, when: float) -> None:
        """The batch's owner cancels it at `when` (as `POST /v1/batches/{id}/cancel` would)."""

        def cancel() -> None:
            run = self.runs[batch_id]
            if run.status is BatchStatus.IN_PROGRESS:
                run.status = BatchStatus.CANCELLING
                self.core.handle(Changed(), self.loop.now)

        self.loop.at(when, cancel)

    def take_down(self, endpoint: str, start_s: float, end_s: float) -> None:
        """The endpoint's server is gone from `start_s` to `end_s` (killed, restarted): requests in flight then are
        reset, new ones find nothing listening, probes get no answer."""

        def down() -> None:
            self._down.add(endpoint)
            for line_id in [line for line, there in self._sent_to.items() if there == endpoint]:
                if line_id not in self._sent_to:
                    continue  # aborted (handed back) when the first of them opened the circuit
                self.engines[endpoint].abort(self._requests.pop(line_id))
                self._answer(line_id, Outcome(OutcomeKind.UNAVAILABLE, message=f"{endpoint}: connection reset"), 0.0)

        self.loop.at(start_s, down)
        self.loop.at(end_s, lambda: self._down.discard(endpoint))

    def _answer(self, line_id: int, outcome: Outcome, latency_s: float) -> None:
        self._sent_to.pop(line_id, None)
        self._perform(self.core.handle(Answered(line_id, outcome, latency_s), self.loop.now))
        self._pump()

    def _arrive(self, spec: BatchSpec) -> None:
        numbered = [Queued(next(self._ids), n, line) for n, line in enumerate(spec.lines, start=1)]
        if self.group_prefixes:
            valid = [ValidLine(q.number, "", 0, 0, 0, prefix_key=q.spec.prefix_key) for q in numbered]
            groups = {v.number: v.prefix_group for v in group_by_prefix(valid)}
            for queued in numbered:
                queued.prefix_group = groups[queued.number]
            numbered.sort(key=lambda q: (q.prefix_group, q.number))
        self.runs[spec.id] = BatchRun(
            spec,
            len(self.runs),
            deque(numbered),
            len(spec.lines),
            sum(line.prompt_tokens for line in spec.lines),
            # As the store estimates it: from each line's output cap (here, what the line will produce).
            sum(expected_output_tokens(line.output_tokens) for line in spec.lines),
        )
        self.core.handle(Changed(), self.loop.now)
        self._arm()
        self._pump()

    # --- the dispatcher's loops, in virtual time -----------------------------------------------------------------

    def _active(self) -> bool:
        return any(run.open_lines > 0 for run in self.runs.values())

    def _arm(self) -> None:
        if not self._polling:
            self._polling = True
            self.loop.at(self.loop.now + self.settings.poll_interval_s, self._poll)
        if (self._scraped or self.core.harvesting) and not self._probing:
            self._probing = True  # phase 0: at once, as the watcher reads when the dispatcher starts
            self.loop.at(self.loop.now + self.probe_phase_s, self._probe)

    def _poll(self) -> None:
        """The fill loop's poll and the housekeeper's look at batch states, every `poll_interval_s`."""
        if not self._active():
            self._polling = False
            return
        self._housekeep()
        self._pump()
        self.loop.at(self.loop.now + self.settings.poll_interval_s, self._poll)

    def _probe(self) -> None:
        """Engine readings every `engine_metrics_interval_s`, as the watcher scrapes /metrics."""
        if not self._active():
            self._probing = False
            return
        loads = {name: self.engines[name].load() for name in self._scraped}
        ttft = (
            {name: self.interactive_ttft(name) for name in self.core.harvest.harvested}
            if self.interactive_ttft is not None
            else {}
        )
        self._perform(self.core.handle(EngineRead(loads, ttft), self.loop.now))
        self._pump()
        self.loop.at(self.loop.now + self.settings.engine_metrics_interval_s, self._probe)

    def _housekeep(self) -> None:
        """What the lifecycle does for a cancelling batch or one past its window: its queued lines end cancelled
        or expired (the core closes the ones it holds); the core is told the states of the batches it holds."""
        for run in self.runs.values():
            if not run.queue:
                continue
            if run.status is BatchStatus.CANCELLING:
                state = RequestState.CANCELLED
            elif self.loop.now >= self._view(run).expires_at:
                state = RequestState.EXPIRED
            else:
                continue
            queued, run.queue = list(run.queue), deque()
            for line in queued:
                self._end(run, line, state, Usage())
        held = self.core.held_batches()
        states = {
            batch_id: (self.runs[batch_id].status, math.ceil(self.runs[batch_id].deadline_s)) for batch_id in held
        }
        self._perform(self.core.handle(BatchStates(states), self.loop.now))

    def _pump(self) -> None:
        """One fill: read the batches when due, lease what the core asks for, perform what it decides."""
        if self._pumping:
            return  # a finish reported while starting: the running fill picks it up
        self._pumping = True
        try:
            now = self.loop.now
            if self.core.poll_due(now):
                self._perform(self.core.handle(BatchesRead(self._dispatchable()), now))
            grants = []
            for action in self.core.handle(Fill(), now):
                if isinstance(action, Lease):
                    grants.append(Grant(action.batch, self._lease(action.batch.id, action.count), action.count))
                else:
                    self._perform([action])
            self._perform(self.core.handle(Leased(grants), now))
        finally:
            self._pumping = False

    def _woken(self) -> None:
        self._wake_at = math.inf
        self._pump()

    # --- the store's part: batches and the line queue ------------------------------------------------------------

    def _dispatchable(self) -> list[DispatchBatch]:
        runs = [
            run
            for run in self.runs.values()
            if run.status is BatchStatus.IN_PROGRESS and run.open_lines > 0 and run.deadline_s > self.loop.now
        ]
        return [self._view(run) for run in sorted(runs, key=lambda r: (r.deadline_s, r.seq))]

    def _view(self, run: BatchRun) -> DispatchBatch:
        spec = run.spec
        created_at = math.floor(spec.arrival_s)  # whole seconds, as the store keeps them
        return DispatchBatch(
            spec.id,
            spec.tenant,
            self.MODEL,
            "/v1/chat/completions",
            created_at + math.ceil(spec.window_s),
            "",
            created_at,
            run.seq,
            spec.weight,
            run.open_lines,
            run.est_prompt,
            run.est_output,
            len(spec.lines),
        )

    def _lease(self, batch_id: str, count: int) -> list[LeasedLine]:
        """Up to `count` queued lines in lease order whose retry time has come."""
        run = self.runs[batch_id]
        leased: list[LeasedLine] = []
        later: list[Queued] = []
        while run.queue and len(leased) < count:
            queued = run.queue.popleft()
            if queued.not_before > self.loop.now:
                later.append(queued)
                continue
            self._leased[queued.id] = (run, queued)
            line = queued.spec
            leased.append(
                LeasedLine(
                    queued.id, batch_id, queued.number, "", 0, 0, queued.attempts, next(self._leases),
                    line.prompt_tokens, line.output_tokens, queued.prefix_group,
                )
            )  # fmt: skip
        run.queue.extendleft(reversed(later))
        return leased

    def _end(self, run: BatchRun, queued: Queued, state: RequestState, usage: Usage) -> None:
        run.open_lines -= 1
        if state is RequestState.SUCCEEDED:
            self.lines_done += 1
            self.last_done_s = self.loop.now
            self.output_tokens += usage.output_tokens
            self.batch_tokens += usage.input_tokens + usage.output_tokens
        else:
            run.failed += 1
            run.expired += state is RequestState.EXPIRED
        if run.open_lines == 0:
            run.finished_s = self.loop.now
            if run.status is BatchStatus.CANCELLING:
                run.status = BatchStatus.CANCELLED
            else:
                run.status = BatchStatus.EXPIRED if run.expired else BatchStatus.COMPLETED
            if self.on_batch_done is not None:
                self.on_batch_done(run)

    # --- actions -------------------------------------------------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Start():
                    self._start(action)
                case Abort():
                    self._abort(action)
                case Record(update):
                    run, queued = self._leased.pop(update.id)
                    if update.is_final:
                        self._end(run, queued, update.state, update.usage)
                    else:  # handed back, or a retry later: back to the head of the queue
                        queued.attempts, queued.not_before = update.attempts, update.next_attempt_at
                        run.queue.appendleft(queued)
                case WakeAt(when):
                    if when < self._wake_at:
                        self._wake_at = when
                        self.loop.at(when, self._woken)
                case SetCeiling(endpoint, ceiling):
                    self.ceilings[endpoint] = ceiling
                case ShareRates(mine):
                    self._perform(self.core.handle(RatesShared(mine), self.loop.now))
                case ShowOutlooks(rows):
                    self.outlooks = list(rows)
                case Probe() | EndpointChanged():
                    self._circuit(action)
                case _:
                    raise TypeError(f"{type(action).__name__} is not performed here")

    def _abort(self, abort: Abort) -> None:
        self._sent_to.pop(abort.line_id, None)
        if request := self._requests.pop(abort.line_id):  # "": refused, it never reached the engine
            self.engines[abort.endpoint].abort(request)
        self.preempted += abort.reason == "preempted"
        self.shed += abort.reason == "shed"
        self._perform(self.core.handle(Unsent(abort.line_id, Unanswered.ABORTED), self.loop.now))

    def _circuit(self, action: Probe | EndpointChanged) -> None:
        """A probe is answered at once (refused during a modelled outage); a change is kept for the caller."""
        if isinstance(action, EndpointChanged):
            self.endpoint_changes.append((self.loop.now, action))
            return
        endpoint = action.endpoint
        error = f"{endpoint}: connection refused" if endpoint in self._down else None
        self.loop.at(self.loop.now, lambda: self._probed(endpoint, error))

    def _refused(self, line_id: int, message: str) -> None:
        if self._requests.pop(line_id, None) is not None:  # not aborted meanwhile
            self._answer(line_id, Outcome(OutcomeKind.UNAVAILABLE, message=message, unreachable=True), 0.0)

    def _probed(self, endpoint: str, error: str | None) -> None:
        self._perform(self.core.handle(Probed(endpoint, error), self.loop.now))
        self._pump()

    def _start(self, start: Start) -> None:
        line = self._leased[start.line.id][1].spec
        started = self.loop.now
        if start.endpoint in self._down:
            self._requests[start.line.id] = ""
            self.loop.at(self.loop.now, lambda: self._refused(start.line.id, f"{start.endpoint}: connection refused"))
            return
        self._sent_to[start.line.id] = start.endpoint
        # One request id per attempt (the lease's sequence number): a line handed back and sent again is a new
        # request to the engine, whatever the old one left behind in an iteration under way.
        request_id = self._requests[start.line.id] = f"l{start.line.id}.{start.line.lease_seq}"

        def done(now: float, outcome: Outcome) -> None:
            self._requests.pop(start.line.id, None)
            self._answer(start.line.id, outcome, now - started)

        self.engines[start.endpoint].submit(
            request_id, line.prompt_tokens, line.output_tokens, line.prefix_blocks, done,
            priority=self._priority[start.endpoint],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Endpoint:
    name: str
    max_concurrency: int


def _batch_priority(cfg: BackendSettings) -> int:
    """The priority production's HTTP backend sends batch lines with (0: none)."""
    return cfg.batch_priority if cfg.flavour in ("vllm", "sglang") and cfg.priority != "off" else 0


def sim_backend(name: str, max_concurrency: int, **extra: Any) -> BackendSettings:
    """A `[[backends]]` entry for a modelled engine; vLLM flavour unless `flavour` says otherwise (its queue and
    token counters are then read as a scrape of its /metrics would read them)."""
    fields: dict[str, Any] = {"flavour": "vllm"} | extra
    return BackendSettings(
        name=name, url=f"http://{name}.sim", models=[VirtualDriver.MODEL], max_concurrency=max_concurrency, **fields
    )
