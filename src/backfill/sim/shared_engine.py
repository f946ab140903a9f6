"""One engine shared by interactive traffic and a batch backlog, in virtual time: what harvesting costs the
interactive users and what it gets done.

The Azure conversation trace is replayed as interactive requests straight into an `IterationEngine` (the
iteration-level vLLM model), compressed in time by `scale` so its busiest minute needs about 90% of the engine;
each interactive request's time to first token is recorded. Meanwhile the production dispatch core
(`VirtualDriver`) works through a backlog of batch lines drawn from the same trace's (prompt, output) pairs, so
batch and interactive tokens are the same mix and "capacity" means the same thing for both. Strategies:

- `interactive`: no batch work (the reference latency);
- `fifo`: batch lines with no limit, the engine's own FCFS queue decides;
- `cap:N`: at most N batch lines in flight, fixed;
- `priority`: no limit, the engine in priority mode and batch lines at low priority (vLLM's
  `--scheduling-policy priority`);
- `backfill`: the harvest controller (policy/harvest.py) sets the limit every second from the proxy's
  interactive TTFT and the engine's queue, lines above a cut are aborted and re-queued, and batch lines carry
  a low priority on a priority engine;
- `backfill-metrics`: the same, for traffic that bypasses the proxy: only what the engine's /metrics says
  (requests waiting, token counters);
- `clairvoyant`: a reference — the controller's load-to-share mapping fed the interactive demand of the current
  30 s, known in advance, instead of a measurement.

backfill's endpoint ceiling (`max_concurrency`) is 128 here: what the operator of a shared 8B engine with 256
sequence slots would allow batch work at most.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from backfill.config import Settings
from backfill.domain.outcomes import Outcome
from backfill.policy.fair import FifoScheduler
from backfill.policy.harvest import HarvestController, Signals, batch_share
from backfill.sim.engine import EngineModel, SimRequest, TokenEvent
from backfill.sim.profile import EngineProfile
from backfill.sim.virtual import BatchSpec, LineSpec, VirtualDriver, sim_backend
from backfill.sim.virtual_engines import EventLoop, IterationEngine

BATCH_PRIORITY = 10
ENDPOINT = "engine"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def load_trace(path: Path) -> list[TraceRequest]:
    """The trace's requests, times in seconds from its first (prompt and output lengths as recorded)."""
    with path.open(newline="") as handle:
        rows = [
            (datetime.fromisoformat(row["TIMESTAMP"][:26]), int(row["ContextTokens"]), int(row["GeneratedTokens"]))
            for row in csv.DictReader(handle)
        ]
    start = min(row[0] for row in rows)
    requests = [
        TraceRequest((when - start).total_seconds(), max(1, prompt), max(1, output)) for when, prompt, output in rows
    ]
    return sorted(requests, key=lambda request: request.at_s)


def engine_seconds(profile: EngineProfile, prompt: int, output: int, decode_batch: int = 64) -> float:
    """Engine time one request needs on a busy engine: its prefill, and each output token's share of a decode
    step among `decode_batch` sequences (the step's fixed cost shared) plus its own attention reads."""
    per_token = profile.decode_seq_s + profile.iteration_base_s / decode_batch
    attention = profile.kv_token_s * output * (prompt + output / 2)
    return profile.prefill_token_s * prompt + per_token * output + attention


def scale_for_peak(trace: list[TraceRequest], profile: EngineProfile, peak_share: float = 0.9) -> float:
    """The time compression that makes the trace's busiest minute need `peak_share` of the engine."""
    minutes: dict[int, float] = {}
    for request in trace:
        minute = int(request.at_s // 60)
        minutes[minute] = minutes.get(minute, 0.0) + engine_seconds(
            profile, request.prompt_tokens, request.output_tokens
        )
    return peak_share * 60.0 / max(minutes.values())


@dataclass
class SharedResult:
    strategy: str
    duration_s: float
    interactive_ttft_s: list[float]
    interactive_sent_s: list[float]  # when each of interactive_ttft_s was sent (virtual seconds)
    # Tokens the engine served inside the measured window, as the real path counts them (bench/harvest_e2e.py):
    # an interactive request's prompt when its first token came out then, its output tokens as they came out
    # then; the batch's, the engine's counters over the window less the interactive ones.
    interactive_tokens: int
    batch_tokens: int
    batch_output_tokens: int
    batch_lines: int  # batch lines that finished inside the window
    shed: int = 0

    def ttft_quantile(self, q: float, since: float = -math.inf, until: float = math.inf) -> float:
        """A quantile of interactive TTFT, of the requests sent in [since, until) (virtual seconds)."""
        sent = zip(self.interactive_ttft_s, self.interactive_sent_s, strict=True)
        ordered = sorted(ttft for ttft, at in sent if since <= at < until)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def batch_output_per_s(self) -> float:
        return self.batch_output_tokens / self.duration_s


class InteractiveReplay:
    """Sends the trace to the engine at its (compressed) times and records each request's TTFT."""

    def __init__(
        self, loop: EventLoop, engine: IterationEngine, trace: list[TraceRequest], scale: float, measure_from: float
    ) -> None:
        """Requests sent before `measure_from` load the engine but are not measured (a warm-up)."""
        self.loop = loop
        self.engine = engine
        self.measure_from = measure_from
        self.ttft_s: list[float] = []
        self.sent_s: list[float] = []  # when each of ttft_s was sent
        self.fresh: list[float] = []  # TTFTs since the proxy's meter was last read
        self.tokens = 0  # prompt + output served from `measure_from` on (see SharedResult)
        self.output_tokens = 0
        self._unanswered: dict[int, float] = {}  # measured requests with no first token yet: when each was sent
        for n, request in enumerate(trace):
            loop.at(request.at_s / scale, functools.partial(self._send, n, request))

    def _send(self, n: int, request: TraceRequest) -> None:
        sent = self.loop.now
        if sent >= self.measure_from:
            self._unanswered[n] = sent

        def first(now: float) -> None:
            if self._unanswered.pop(n, None) is not None:
                self.ttft_s.append(now - sent)
                self.sent_s.append(sent)
            self.fresh.append(now - sent)

        def served(now: float, event: TokenEvent) -> None:
            if now >= self.measure_from:
                self.tokens += event.num_tokens + (request.prompt_tokens if event.is_first_token else 0)
                self.output_tokens += event.num_tokens

        blocks = own_blocks(n, request.prompt_tokens, self.engine.model.profile.block_size)
        self.engine.submit(
            f"i{n}", request.prompt_tokens, request.output_tokens, blocks, _ignore, first_token=first, served=served
        )

    def drain(self) -> list[float]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def close(self, now: float) -> None:
        """The end: a measured request still without a first token counts as what it has waited (at least its
        TTFT), as harvest_e2e counts one on the real path; left out, the slowest requests made the tail shorter."""
        for sent in self._unanswered.values():
            self.ttft_s.append(now - sent)
            self.sent_s.append(sent)
        self._unanswered.clear()


def _ignore(now: float, outcome: Outcome) -> None:
    """An interactive request's end: its tokens were counted as they came out."""


class Clairvoyant(HarvestController):
    """A reference, not a controller: the controller's mapping from interactive load to batch share
    (`batch_share`, same band) fed the interactive demand of the current `window_s` (engine seconds per second,
    from the trace itself, future included) instead of a measurement; no congestion control on top."""

    def __init__(self, max_limit: int, demand: dict[int, float], window_s: float) -> None:
        super().__init__(max_limit)
        self.demand, self.window_s = demand, window_s

    def tick(self, now: float, signals: Signals, cap: float | None = None) -> int:
        load = self.demand.get(int(now // self.window_s), 0.0)
        self.limit = self.max_limit * batch_share(load, self.fill_below, self.target)
        self.shed = False
        return self.current


def clairvoyant(
    trace: list[TraceRequest], profile: EngineProfile, scale: float, window_s: float = 30.0
) -> Callable[[int], HarvestController]:
    demand: dict[int, float] = {}
    for request in trace:
        key = int(request.at_s / scale // window_s)
        cost = engine_seconds(profile, request.prompt_tokens, request.output_tokens)
        demand[key] = demand.get(key, 0.0) + cost / window_s
    return lambda max_limit: Clairvoyant(max_limit, demand, window_s)


def batch_backlog(trace: list[TraceRequest], count: int, seed: int, block_size: int) -> BatchSpec:
    rng = random.Random(seed)
    drawn = (rng.choice(trace) for _ in range(count))
    lines = [
        LineSpec(r.prompt_tokens, r.output_tokens, own_blocks(BATCH_OWNERS + n, r.prompt_tokens, block_size))
        for n, r in enumerate(drawn)
    ]
    return BatchSpec("backlog", "tenant", 0.0, 7 * 86400.0, lines)


BATCH_OWNERS = 1 << 24  # own_blocks owners from here on are batch lines; below, interactive requests
_BLOCKS_PER_OWNER = 1 << 20


def own_blocks(owner: int, prompt_tokens: int, block_size: int) -> tuple[int, ...]:
    """Prefix-cache hashes of the full blocks of a prompt that shares none with any other (as harvest_e2e's random
    texts): no request hits another's, but a preempted sequence finds its own blocks again when it is readmitted
    (unless evicted meanwhile), as on vLLM with prefix caching on — without them a preemption recomputed the whole
    prompt, and the twin of engine priority lost a third of its harvest to recomputing."""
    start = owner * _BLOCKS_PER_OWNER
    return tuple(range(start, start + prompt_tokens // block_size))


# Saturated from idle, an engine serves ~8 % more than its steady rate for about 25 s: every sequence starts at
# once, with a short context, and the first wave's long answers have not yet piled up. Capacity is counted after.
CAPACITY_WARMUP_S = 30.0


def capacity_tokens_per_s(
    profile: EngineProfile, trace: list[TraceRequest], seed: int, seconds: float = 300.0
) -> float:
    """Prompt + output tokens per second the engine serves when saturated with the trace's request mix (the
    requests kept at max_num_seqs and a queue, as many as fit), counted over `seconds` after a warm-up of
    `CAPACITY_WARMUP_S`: the capacity harvest efficiency divides by."""
    model = EngineModel(profile)
    rng = random.Random(seed)
    now, n = 0.0, 0
    start: tuple[float, int] | None = None
    while now < CAPACITY_WARMUP_S + seconds:
        if start is None and now >= CAPACITY_WARMUP_S:
            start = (now, engine_tokens(model))
        while model.num_running + model.num_waiting < profile.max_num_seqs + 16:
            request = rng.choice(trace)
            model.submit(SimRequest(f"c{n}", request.prompt_tokens, (), request.output_tokens, arrival_s=now))
            n += 1
        step = model.step()
        assert step is not None
        now += step.duration_s
    assert start is not None
    return (engine_tokens(model) - start[1]) / (now - start[0])


def engine_tokens(model: EngineModel) -> int:
    """Prompt + output tokens the engine has counted (vLLM's prompt_tokens_total + generation_tokens_total)."""
    return model.totals.prompt_tokens + model.totals.generation_tokens


def run(
    strategy: str,
    trace: list[TraceRequest],
    profile: EngineProfile,
    *,
    scale: float,
    duration_s: float,
    backlog: int = 60_000,
    seed: int = 11,
    controller: Callable[[int], HarvestController] | None = None,
    max_concurrency: int = 128,
    warmup_s: float = 0.0,
    capacity: float | None = None,
    probe_phase_s: float = 0.0,
    batch_from: list[TraceRequest] | None = None,
) -> SharedResult:
    """Replay `duration_s` seconds (virtual) of the compressed trace under one strategy.

    With `warmup_s`, only what follows the first `warmup_s` is measured (the TTFT of interactive requests sent
    from then on, tokens served from then on; the result's duration is what is left): a window of steady state,
    the batch having started with the trace. `capacity`: the harvested endpoint's
    `capacity_tokens_per_s`, as configured (None: learned). `probe_phase_s`: when the dispatcher first reads the
    engine (then once a second): on the real path its readings fall anywhere relative to the trace, and a
    controller's p99 moves with that phase (the twin of harvest_e2e's slice: +28 % to +104 % over 20 phases).
    `batch_from`: the (prompt, output) pairs batch lines are drawn from (default: the trace's own).

    Batch work goes through the production dispatch core (`VirtualDriver`), configured as a user would configure
    the endpoint: a fixed `max_concurrency` (no limit, or a cap), `priority` on or off, `harvest = true` for the
    backfill rows. `controller` replaces the harvest controller (a reference such as `clairvoyant`).
    """
    priority = strategy in ("priority", "backfill", "backfill-metrics", "clairvoyant")
    engine_profile = dataclasses.replace(profile, scheduling_policy="priority" if priority else "fcfs")
    loop = EventLoop()
    engine = IterationEngine(loop, engine_profile)
    counted: dict[str, int] = {}  # the engine's and the batch's counts at the end of the warm-up
    interactive = InteractiveReplay(loop, engine, [r for r in trace if r.at_s / scale < duration_s], scale, warmup_s)
    result = SharedResult(strategy, duration_s - warmup_s, interactive.ttft_s, interactive.sent_s, 0, 0, 0, 0)
    driver: VirtualDriver | None = None
    if strategy != "interactive":
        harvest = strategy.startswith("backfill") or strategy == "clairvoyant"
        if strategy.startswith("cap:"):
            ceiling = int(strategy.split(":", 1)[1])
        else:
            ceiling = max_concurrency if harvest else 4 * profile.max_num_seqs
        endpoint = sim_backend(
            ENDPOINT, ceiling, adaptive_concurrency=False, harvest=harvest, batch_priority=BATCH_PRIORITY,
            priority="on" if priority else "off", capacity_tokens_per_s=capacity if harvest else None,
        )  # fmt: skip
        settings = Settings(backends=[endpoint], fair_share_preemption=False)
        proxy = strategy in ("backfill", "clairvoyant")
        driver = VirtualDriver(
            loop, {ENDPOINT: engine}, settings, scheduler=FifoScheduler, promote=False, group_prefixes=False,
            interactive_ttft=(lambda _: interactive.drain()) if proxy else None, probe_phase_s=probe_phase_s,
        )  # fmt: skip
        make = clairvoyant(trace, profile, scale) if strategy == "clairvoyant" else controller
        if harvest and make is not None:
            driver.core.harvest.harvested[ENDPOINT].controller = make(ceiling)
        driver.submit_at(batch_backlog(batch_from or trace, backlog, seed, profile.block_size))
    if warmup_s > 0:
        loop.at(warmup_s, lambda: counted.update(counts(engine, driver)))
    loop.run(until=duration_s)
    interactive.close(duration_s)
    # The engine's counters include the iteration running at either bound: a window's edges are exact to within
    # one iteration, as a scrape's are.
    served = {key: value - counted.get(key, 0) for key, value in counts(engine, driver).items()}
    result.interactive_tokens = interactive.tokens
    if driver is not None:
        result.batch_lines = served["lines"]
        result.batch_tokens = max(0, served["tokens"] - interactive.tokens)
        result.batch_output_tokens = max(0, served["output"] - interactive.output_tokens)
        result.shed = driver.shed
    return result


def counts(engine: IterationEngine, driver: VirtualDriver | None) -> dict[str, int]:
    """The engine's token counters and the batch's finished lines, now."""
    totals = engine.model.totals
    lines = driver.lines_done if driver is not None else 0
    return {"tokens": engine_tokens(engine.model), "output": totals.generation_tokens, "lines": lines}


def harvest_efficiency(result: SharedResult, capacity: float) -> float:
    """Batch tokens served over the tokens the engine could have served beyond the interactive ones."""
    idle = capacity * result.duration_s - result.interactive_tokens
    return result.batch_tokens / idle if idle > 0 else float("nan")
