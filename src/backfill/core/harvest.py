"""Once a second, what each engine says about its load, turned into limits. Pure: readings in, limits out.

- An endpoint whose engine reports its queue (vLLM, SGLang, llama.cpp metrics): the queue feeds its adaptive
  concurrency limit (policy/limits.py, `on_engine_load`).
- An endpoint with harvest on (`harvest = true`, or "auto", the default, once interactive traffic shows up
  there): its harvest controller (policy/harvest.py) sets a ceiling on its batch lines from the proxy's
  interactive TTFT, the engine's queue and token counters, and the off-peak share of each pool it serves; when
  the controller cuts for interactive traffic in trouble, the lines above the ceiling that have done little work
  are returned, to be aborted and handed back. A pool with a batch promoted for its deadline is not held back
  (its guaranteed share comes first). Until then an "auto" endpoint is dedicated: no ceiling but the off-peak
  one.

With several workers on one harvested endpoint, each publishes its batch-token counter per endpoint
(`counters`): every controller then counts all workers' batch tokens as batch work (not the others' as
interactive) and each worker takes its part of the ceiling (the ceiling over the workers sharing the endpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from backfill.config import Settings
from backfill.core.pool import Pool, Start
from backfill.domain.engine_load import EngineLoad
from backfill.domain.usage_report import Capacity
from backfill.policy.harvest import HarvestController, OffPeak, Signals
from backfill.policy.limits import EndpointLimits


@dataclass
class _Harvested:
    controller: HarvestController
    engine_tokens: int | None = None  # the engine's counter at the last reading
    served_tokens: int = 0  # our lines' tokens at the last reading
    others: Mapping[str, int] = field(default_factory=dict)  # other workers' counters at the last reading


class Harvest:
    """The harvest controllers of one worker's shared endpoints, and the engine queues of all of them."""

    def __init__(self, settings: Settings, limits: dict[str, EndpointLimits], pools: dict[str, Pool]) -> None:
        self.limits = limits
        self.pools = pools
        self.harvested = {
            cfg.name: _Harvested(
                HarvestController(
                    cfg.max_concurrency,
                    target=cfg.harvest_target,
                    fill_below=cfg.harvest_fill_below,
                    capacity_tokens_per_s=cfg.capacity_tokens_per_s,
                    shared=cfg.harvest is True,
                )
            )
            for cfg in settings.backends
            if cfg.harvest is not False and cfg.name in limits
        }
        self.off_peak: dict[str, OffPeak] = {entry.model: entry.to_policy() for entry in settings.off_peak}
        self.ceilings: dict[str, int] = {}  # the ceiling each controller set at the last reading (this worker's part)
        self.waiting: dict[str, int] = {}  # the engine's queue at the last reading that had it

    def ttft_baseline_s(self, name: str) -> float | None:
        """The interactive TTFT the endpoint's controller holds batch work to (None: not learned, or not harvested)."""
        harvested = self.harvested.get(name)
        return None if harvested is None else harvested.controller.baseline_s

    def counters(self) -> dict[str, int]:
        """This worker's batch-token counter per harvested endpoint, for the other workers to read."""
        return {name: self.limits[name].served_tokens for name in self.harvested}

    def read(
        self,
        now: float,
        loads: Mapping[str, EngineLoad | None],
        ttft: Mapping[str, Sequence[float]],
        others: Mapping[str, Mapping[str, int]],
    ) -> tuple[dict[str, int], list[Start]]:
        """Fold in one round of readings; return the ceilings set and the lines to abort and hand back."""
        for name, load in loads.items():
            if load is not None and load.waiting is not None and name in self.limits:
                self.limits[name].on_engine_load(now, load.waiting)
                self.waiting[name] = load.waiting
            else:
                self.waiting.pop(name, None)
        ceilings: dict[str, int] = {}
        victims: list[Start] = []
        for name, harvested in self.harvested.items():
            unread = name in loads and loads[name] is None  # it has /metrics (they are scraped), unreadable now
            ceilings[name], shed = self._harvest(
                now, name, harvested, loads.get(name), unread, ttft.get(name, ()), others.get(name, {})
            )
            victims += shed
        self.ceilings = ceilings
        return ceilings, victims

    def _harvest(
        self,
        now: float,
        name: str,
        harvested: _Harvested,
        load: EngineLoad | None,
        unread: bool,
        ttft: Sequence[float],
        others: Mapping[str, int],
    ) -> tuple[int, list[Start]]:
        limits, controller = self.limits[name], harvested.controller
        # Other workers' batch tokens since the last reading (a worker seen for the first time, or restarted with
        # a counter that went back, counts from its next reading).
        seen = harvested.others
        others_tokens = sum(n - seen[w] for w, n in others.items() if w in seen and n >= seen[w])
        harvested.others = dict(others)
        engine_tokens = None
        if load is not None and load.tokens is not None:
            if harvested.engine_tokens is not None and load.tokens >= harvested.engine_tokens:
                engine_tokens = load.tokens - harvested.engine_tokens  # None after a restart (counter reset)
            harvested.engine_tokens = load.tokens
        signals = Signals(
            engine_tokens=engine_tokens,
            batch_tokens=limits.served_tokens - harvested.served_tokens + others_tokens,
            interactive_ttft_s=ttft,
            engine_waiting=load.waiting if load is not None else None,
            batch_in_flight=limits.in_flight,
            engine_unread=unread,
        )
        harvested.served_tokens = limits.served_tokens
        serving = [pool for pool in self.pools.values() if name in pool.limits]
        models = [model for model, pool in self.pools.items() if name in pool.limits]
        shares = [self.off_peak[model].share(now) for model in models if model in self.off_peak]
        cap = min(shares) * controller.max_limit if shares else None
        age = controller.shed_age_s  # before the tick: a cut forgets the samples it was judged on
        ceiling = math.ceil(controller.tick(now, signals, cap) / (1 + len(others)))  # this worker's part
        promoted = any(pool.promoted for pool in serving)
        dedicated = not controller.shared and cap is None  # harvest "auto" before interactive traffic shows up
        limits.ceiling = None if promoted or dedicated else ceiling
        off_peak = any(self.off_peak[model].is_in_window(now) for model in models if model in self.off_peak)
        capacity = Capacity.DEDICATED if dedicated else Capacity.OFF_PEAK if off_peak else Capacity.HARVESTED
        for pool in serving:
            pool.capacity_of[name] = capacity
            if controller.shared:
                pool.harvest[name] = controller.state
        if not controller.shed or promoted:
            return ceiling, []
        return ceiling, [start for pool in serving for start in pool.shed(now, age)]
