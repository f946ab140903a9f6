"""How many batch lines an endpoint shared with interactive traffic may run now: a congestion controller.

Batch work must be invisible to the endpoint's interactive users, so batch concurrency is set the way a
scavenger transport (LEDBAT) sets its window: it backs off as soon as the foreground traffic needs the room, and
grows slowly while it does not. Once a second (`tick`), two limits, the lower of which holds:

- **Interactive load** sets a ceiling. Over the last `rate_window_s`, the engine's token counters say what it
  processed and our own lines say what part of that was batch; the rest, over the engine's capacity, is the
  interactive load. Batch may use the whole endpoint (`max_limit`) while that load is below `fill_below`,
  nothing once it reaches `target`, and a linear share between. The load estimate rises at once but falls back
  with a time constant of `release_s`: interactive traffic comes in busy periods whose bursts are seconds
  apart, and a batch line started in the lull before the next burst is still prefilling when it arrives (the
  interactive tail is made in those periods; the quiet ones, where batch fills the engine, cost it little).
- **Congestion**, AIMD: the limit is cut multiplicatively (x `backoff`, down to 0) when `queue_min` or more
  requests wait in the engine in two readings in a row (one reading catches requests between their arrival and
  the next iteration, our own among them) or when interactive time to first token over the last few seconds
  exceeds its baseline by more than `tolerance`; otherwise it grows additively, `step` lines a second.

Whatever lifts it, the limit rises at most `step` lines a tick: a jump of the ceiling would otherwise send a
handful of prompts into the engine at once, one long iteration for every interactive request that arrives then.

The baseline is what interactive latency is when batch work is not in the way: a high quantile of the TTFT
measured while no batch line ran (the controller starts at 0, and the busy periods measure it again). It keeps
learning: the samples are taken in periods of `baseline_period_s`, each period with `min_clean` samples gives
its quantile, and the baseline is the lowest of the last `baseline_periods` of them (a decaying minimum): one
noisy quiet period cannot raise it and switch protection off, and a quiet period that was faster than the
engine is now ages out. A tick without interactive samples says nothing about latency; only the engine's queue
is read then.

An engine whose /metrics cannot be read (`engine_unread`) is harvested blind: its batch share is held to
`blind_share` of the endpoint whatever else is known, and only the proxy's TTFT can lower it further.

`shared = False` is harvest "auto" (the default for every backend): the endpoint is treated as dedicated to
batch work (the whole endpoint, no restraint) until interactive traffic is first seen on it — a TTFT sample from
the proxy, an interactive load of `seen_load` or more in the engine's counters — or its metrics cannot be read;
from then on it is harvested as above.

The capacity is configured or learned: the throughput the engine delivers while requests queue in it (averaged,
as it varies with the mix), and never less than what it has been seen to deliver once learned.

When the limit falls below the batch lines in flight after a cut, the caller aborts the newest (their engine
slots free at once) and puts them back in the queue without charging an attempt (`core.pool.Pool.shed`).

Off-peak windows cap the limit at a share of `max_limit` by time of day (`OffPeak`); a batch promoted for its
deadline is owed its guaranteed share whatever the controller says (`floor`). Pure: time is an argument.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from enum import StrEnum
from zoneinfo import ZoneInfo


class HarvestState(StrEnum):
    """What holds an endpoint's batch work, as shown to users."""

    HARVESTING = "harvesting"  # growing or at the ceiling: batch takes what interactive traffic leaves
    THROTTLED = "throttled"  # cut or held low because interactive traffic needs the capacity
    OFF_PEAK_CAP = "off_peak_cap"  # held at the share the time of day allows
    BLIND = "blind"  # the engine's /metrics cannot be read: held to `blind_share` of the endpoint


@dataclass(frozen=True, slots=True)
class Signals:
    """What one tick knows about the endpoint.

    `engine_tokens`: tokens (prompt + output) the engine processed since the last tick, ours included, from its
    token counters (None: not reported). `batch_tokens`: our part of them as far as we know: the prompt tokens
    of our lines that started there since the last tick (an engine prefills a prompt within an iteration or two
    of its arrival) and the output tokens of those that finished. `interactive_ttft_s`: times to first token of
    interactive requests through the proxy since the last tick. `engine_waiting`: requests waiting in the engine,
    ours included (None: no metrics).
    """

    engine_tokens: int | None = None
    batch_tokens: int = 0
    interactive_ttft_s: Sequence[float] = ()
    engine_waiting: int | None = None
    batch_in_flight: int = 0
    engine_unread: bool = False  # the engine has /metrics but they could not be read this tick


@dataclass
class _Rate:
    """Tokens per second over a sliding window of ticks."""

    window_s: float
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (when, tokens since the tick before)
    since: float | None = None

    def add(self, now: float, tokens: float) -> None:
        if self.since is None:
            self.since = now
        self.samples.append((now, tokens))
        while self.samples and self.samples[0][0] <= now - self.window_s:
            self.samples.popleft()
            self.since = self.samples[0][0] if self.samples else now

    def per_s(self, now: float) -> float | None:
        assert self.since is not None
        elapsed = now - self.since
        if elapsed < self.window_s / 2:
            return None
        return sum(tokens for when, tokens in self.samples if when > self.since) / elapsed


@dataclass
class HarvestController:
    """One endpoint's batch concurrency limit; `tick` about once a second."""

    max_limit: int  # the concurrency that fills the engine with batch work alone (the endpoint's ceiling)
    target: float = 0.78  # interactive load (share of the engine's token capacity) at which batch gets nothing
    fill_below: float = 0.4  # ... and below which batch may use the whole endpoint
    release_s: float = 60.0  # the interactive load estimate rises at once and falls back this slowly
    capacity_tokens_per_s: float | None = None  # None: learned from the throughput seen while the engine queued
    tolerance: float = 0.10  # interactive TTFT may exceed its baseline by this much
    backoff: float = 0.5  # the cut when interactive requests queue or slow down
    step: float = 0.0  # lines per tick when growing; 0: max(1, max_limit / 32)
    rate_window_s: float = 30.0
    recent_s: float = 10.0
    watch_quantile: float = 0.9  # recent TTFT at this quantile ...
    base_quantile: float = 0.99  # ... against this quantile of TTFT measured while no batch line ran
    queue_min: int = 3  # requests waiting in the engine, in two readings in a row, that count as congestion
    min_samples: int = 10
    min_clean: int = 50
    baseline_period_s: float = 300.0
    baseline_periods: int = 12
    blind_share: float = 0.5  # the share of the endpoint batch may use while the engine's metrics are unreadable
    shared: bool = True  # False: harvest "auto", dedicated until interactive traffic is seen (module docstring)
    seen_load: float = 0.25  # above the error of "engine tokens minus ours" (ours are counted as sent and done)
    limit: float = 0.0
    state: HarvestState = HarvestState.HARVESTING
    cuts: int = 0
    shed: bool = False  # the last tick cut for interactive traffic in trouble: lines above the limit go back now
    share: float | None = None  # the share of `max_limit` the interactive load leaves (None: unknown)
    _aimd: float = 0.0
    _engine: _Rate = field(init=False)
    _batch: _Rate = field(init=False)
    _recent: deque[tuple[float, float]] = field(default_factory=deque)
    _clean: list[float] = field(default_factory=list)  # this baseline period's samples
    _clean_since: float | None = None
    _periods: deque[float] = field(default_factory=deque)  # the quantile of each of the last periods
    _last_queue: int = 0
    _learned: float = 0.0
    _load: float | None = None  # interactive load estimate, with its slow release
    _load_at: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.fill_below < self.target:
            raise ValueError(f"fill_below ({self.fill_below}) must be at least 0 and below target ({self.target})")
        if self.step <= 0:
            self.step = max(1.0, self.max_limit / 32)
        self._engine = _Rate(self.rate_window_s)
        self._batch = _Rate(self.rate_window_s)

    @property
    def current(self) -> int:
        return int(self.limit)

    @property
    def capacity(self) -> float | None:
        return self.capacity_tokens_per_s or self._learned or None

    @property
    def shed_age_s(self) -> float:
        """Lines in flight longer than this are not shed: they have had their prompt processed (the bulk of a
        line's cost) and finishing them costs the engine less than doing it again later. Twice the recent
        median interactive TTFT (a prompt's time to be processed here), 0.5 s when unknown."""
        if len(self._recent) < self.min_samples:
            return 0.5
        return 2 * _quantile(sorted(t for _, t in self._recent), 0.5)

    @property
    def baseline_s(self) -> float | None:
        """Interactive TTFT without batch work in the way (None until `min_clean` samples are in)."""
        values = list(self._periods)
        if len(self._clean) >= self.min_clean:
            values.append(_quantile(sorted(self._clean), self.base_quantile))
        return min(values) if values else None

    def tick(self, now: float, signals: Signals, cap: float | None = None) -> int:
        """Fold in one tick of signals; return the new limit (0 to `max_limit`, and at most `cap`)."""
        queued = self._queued(signals)
        slow = self._slow(now, signals)
        self.share = self._share(now, signals, queued)
        if not self.shared:
            seen = self._load is not None and self._load >= self.seen_load
            self.shared = seen or bool(signals.interactive_ttft_s) or signals.engine_unread
            if not self.shared:
                return self._dedicated(cap)
        if signals.engine_unread:
            self.share = min(1.0 if self.share is None else self.share, self.blind_share)
        self.shed = queued or slow
        if self.shed:
            self._aimd = math.floor(min(self._aimd, self.limit) * self.backoff)
            self.cuts += 1
        else:
            self._aimd = min(float(self.max_limit), self._aimd + self.step)
        ceiling = self.max_limit if self.share is None else self.max_limit * self.share
        self.limit = min(self._aimd, ceiling, self.limit + self.step)
        held = self.shed or ceiling < self._aimd
        self.state = HarvestState.THROTTLED if held else HarvestState.HARVESTING
        if signals.engine_unread and not self.shed:
            self.state = HarvestState.BLIND
        if cap is not None and self.limit > cap:
            self.limit = float(max(0, math.floor(cap)))
            if self.state is HarvestState.HARVESTING:
                self.state = HarvestState.OFF_PEAK_CAP
        return self.current

    def _dedicated(self, cap: float | None) -> int:
        """No interactive traffic seen yet: the whole endpoint (within the off-peak cap)."""
        self._aimd = self.limit = float(self.max_limit)
        self.shed = False
        self.state = HarvestState.HARVESTING
        if cap is not None and cap < self.limit:
            self.limit = float(max(0, math.floor(cap)))
            self.state = HarvestState.OFF_PEAK_CAP
        return self.current

    def _share(self, now: float, signals: Signals, queued: bool) -> float | None:
        """The share of `max_limit` the interactive load leaves: 1 below `fill_below`, 0 from `target` on."""
        load = self._interactive_load(now, signals, queued)
        return None if load is None else batch_share(load, self.fill_below, self.target)

    def _interactive_load(self, now: float, signals: Signals, queued: bool) -> float | None:
        """Interactive tokens/s over the capacity, the estimate released slowly (None: not known yet)."""
        if signals.engine_tokens is None:
            return None
        self._engine.add(now, signals.engine_tokens)
        self._batch.add(now, signals.batch_tokens)
        total, batch = self._engine.per_s(now), self._batch.per_s(now)
        if total is None or batch is None:
            return None
        if queued:  # the engine is full: what it serves now is its capacity (averaged, as it varies with the mix)
            self._learned = total if not self._learned else self._learned + 0.05 * (total - self._learned)
        elif self._learned and total > self._learned:
            self._learned = total  # it has served this much: its capacity is at least that
        capacity = self.capacity
        if capacity is None:
            return None
        load = max(0.0, total - batch) / capacity
        if self._load is not None and load < self._load:
            load += (self._load - load) * math.exp(-(now - self._load_at) / self.release_s)
        self._load, self._load_at = load, now
        return load

    def _queued(self, signals: Signals) -> bool:
        """Requests waiting in the engine in two readings in a row (one reading catches requests between their
        arrival and the next iteration): the engine is full, and the next interactive burst would wait."""
        if signals.engine_waiting is None:
            return False
        lasting = min(signals.engine_waiting, self._last_queue)
        self._last_queue = signals.engine_waiting
        return lasting >= self.queue_min

    def _slow(self, now: float, signals: Signals) -> bool:
        """Recent interactive TTFT past its baseline by more than the tolerance."""
        for ttft in signals.interactive_ttft_s:
            self._recent.append((now, ttft))
        self._learn_baseline(now, signals)
        while self._recent and self._recent[0][0] <= now - self.recent_s:
            self._recent.popleft()
        baseline = self.baseline_s
        if len(self._recent) < self.min_samples or baseline is None:
            return False
        if _quantile(sorted(t for _, t in self._recent), self.watch_quantile) <= baseline * (1 + self.tolerance):
            return False
        self._recent.clear()  # judge the cut on latency measured after it, as TCP cuts once per round trip
        return True

    def _learn_baseline(self, now: float, signals: Signals) -> None:
        """Collect TTFT measured with no batch line running, one period at a time (`baseline_s`)."""
        if self._clean_since is None:
            self._clean_since = now
        elif now - self._clean_since >= self.baseline_period_s:
            if len(self._clean) >= self.min_clean:
                self._periods.append(_quantile(sorted(self._clean), self.base_quantile))
                while len(self._periods) > self.baseline_periods:
                    self._periods.popleft()
            self._clean, self._clean_since = [], now
        if signals.batch_in_flight == 0:
            self._clean.extend(signals.interactive_ttft_s)


def batch_share(interactive_load: float, fill_below: float, target: float) -> float:
    """The share of an endpoint batch may use at this interactive load (a share of the engine's capacity)."""
    return min(1.0, max(0.0, (target - interactive_load) / (target - fill_below)))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True, slots=True)
class Window:
    """From `start` to `end` local time (wrapping past midnight when end <= start), batch may use `share`."""

    start: time
    end: time
    share: float

    def contains(self, moment: time) -> bool:
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


@dataclass(frozen=True, slots=True)
class OffPeak:
    """Shares of an endpoint's capacity batch work may use by time of day, in a named time zone; `default`
    outside every window. The first window that contains the moment wins."""

    windows: tuple[Window, ...] = ()
    default: float = 1.0
    timezone: str = "UTC"

    def share(self, now: float) -> float:
        window = self._window_at(now)
        return self.default if window is None else window.share

    def is_in_window(self, now: float) -> bool:
        return self._window_at(now) is not None

    def _window_at(self, now: float) -> Window | None:
        local = datetime.fromtimestamp(now, UTC).astimezone(ZoneInfo(self.timezone)).time()
        for window in self.windows:
            if window.contains(local):
                return window
        return None
