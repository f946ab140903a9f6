"""Once a second, what each engine says about its load, turned into limits.

- A backend whose flavour exposes metrics (vLLM, SGLang, llama.cpp): its queue feeds its adaptive concurrency
  limit (policy/limits.py, `on_engine_load`).
- A backend marked `harvest = true` (shared with interactive traffic): its harvest controller (policy/harvest.py)
  sets a ceiling on its batch lines from the proxy's interactive TTFT (`InteractiveMeter`), the engine's queue and
  token counters, and the off-peak share of each pool it serves; when the controller cuts for interactive traffic
  in trouble, the lines above the ceiling that have done little work are returned for the dispatcher to abort.
  A pool with a batch promoted for its deadline is not held back (its guaranteed share comes first).

With several workers on one harvested endpoint, each publishes its batch-token counter per backend (`share`, the
database in production): every controller then counts all workers' batch tokens as batch work (not the others'
as interactive) and each worker takes its part of the ceiling (the ceiling over the workers sharing the endpoint).

No scheduling happens here: the watcher reads, asks the policy, and sets numbers on the pools' limits.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import structlog

from backfill.backends.engine_metrics import EngineLoad, EngineMetrics
from backfill.config import Settings
from backfill.dispatch.pools import Pool, Start
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics
from backfill.policy.harvest import HarvestController, OffPeak, Signals
from backfill.policy.limits import EndpointLimits

log = structlog.get_logger(__name__)

# Publish this process's batch-token counter per backend; get the other live workers', by backend then worker.
ShareTokens = Callable[[dict[str, int]], Awaitable[dict[str, dict[str, int]]]]


@dataclass
class _Harvested:
    controller: HarvestController
    engine_tokens: int | None = None  # the engine's counter at the last reading
    served_tokens: int = 0  # our lines' tokens at the last reading
    others: dict[str, int] = field(default_factory=dict)  # other workers' counters at the last reading


class EngineWatcher:
    def __init__(
        self,
        settings: Settings,
        limits: dict[str, EndpointLimits],
        pools: dict[str, Pool],
        clock: Callable[[], float],
        metrics: Metrics,
        interactive: InteractiveMeter | None = None,
        share: ShareTokens | None = None,
    ) -> None:
        self.limits = limits
        self.share = share
        self.pools = pools
        self.clock = clock
        self.metrics = metrics
        self.interactive = interactive
        configured = [cfg for cfg in settings.backends if cfg.name in limits]
        self._watched = [cfg for cfg in configured if EngineMetrics.supports(cfg)]
        self.probes: list[EngineMetrics] = []
        self.harvested = {
            cfg.name: _Harvested(
                HarvestController(
                    cfg.max_concurrency,
                    target=cfg.harvest_target,
                    fill_below=cfg.harvest_fill_below,
                    capacity_tokens_per_s=cfg.capacity_tokens_per_s,
                )
            )
            for cfg in configured
            if cfg.harvest
        }
        self.off_peak: dict[str, OffPeak] = {entry.model: entry.to_policy() for entry in settings.off_peak}

    @property
    def active(self) -> bool:
        return bool(self._watched or self.harvested)

    def connect(self, client: httpx.AsyncClient) -> None:
        self.probes = [EngineMetrics(cfg, client) for cfg in self._watched]

    async def tick(self) -> list[tuple[Pool, Start]]:
        """Read every engine once; set the limits; return the lines to abort and hand back."""
        readings = await asyncio.gather(*(probe.load() for probe in self.probes))
        loads = {probe.name: load for probe, load in zip(self.probes, readings, strict=True)}
        now = self.clock()
        for name, load in loads.items():
            if load is not None and load.waiting is not None:
                self.limits[name].on_engine_load(now, load.waiting)
        victims: list[tuple[Pool, Start]] = []
        counters = await self._share_counters()
        for name, harvested in self.harvested.items():
            victims += self._harvest(now, name, harvested, loads.get(name), counters.get(name, {}))
        return victims

    async def _share_counters(self) -> dict[str, dict[str, int]]:
        if self.share is None or not self.harvested:
            return {}
        try:
            return await self.share({name: self.limits[name].served_tokens for name in self.harvested})
        except Exception:
            log.exception("watcher.share_failed")  # harvest as if alone until the database answers again
            return {}

    def _harvest(
        self, now: float, name: str, harvested: _Harvested, load: EngineLoad | None, others: dict[str, int]
    ) -> list[tuple[Pool, Start]]:
        limits, controller = self.limits[name], harvested.controller
        # Other workers' batch tokens since the last reading (a worker seen for the first time, or restarted with
        # a counter that went back, counts from its next reading).
        seen = harvested.others
        others_tokens = sum(n - seen[w] for w, n in others.items() if w in seen and n >= seen[w])
        harvested.others = others
        engine_tokens = None
        if load is not None and load.tokens is not None:
            if harvested.engine_tokens is not None and load.tokens >= harvested.engine_tokens:
                engine_tokens = load.tokens - harvested.engine_tokens  # None after a restart (counter reset)
            harvested.engine_tokens = load.tokens
        signals = Signals(
            engine_tokens=engine_tokens,
            batch_tokens=limits.served_tokens - harvested.served_tokens + others_tokens,
            interactive_ttft_s=self.interactive.drain_ttft(name) if self.interactive is not None else (),
            engine_waiting=load.waiting if load is not None else None,
            batch_in_flight=limits.in_flight,
        )
        harvested.served_tokens = limits.served_tokens
        serving = {model: pool for model, pool in self.pools.items() if name in pool.limits}
        shares = [self.off_peak[model].share(now) for model in serving if model in self.off_peak]
        cap = min(shares) * controller.max_limit if shares else None
        age = controller.shed_age_s  # before the tick: a cut forgets the samples it was judged on
        ceiling = math.ceil(controller.tick(now, signals, cap) / (1 + len(others)))  # this worker's part
        self.metrics.harvest_limit.labels(name).set(ceiling)
        promoted = any(pool.promoted for pool in serving.values())
        limits.ceiling = None if promoted else ceiling
        for pool in serving.values():
            pool.harvest[name] = controller.state
        if not controller.shed or promoted:
            return []
        return [(pool, start) for pool in serving.values() for start in pool.shed(now, age)]
