"""The engine watcher turns one reading per engine into limits: adaptive limits, harvest ceilings, off-peak caps."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

from backfill.backends.engine_metrics import EngineLoad
from backfill.config import Settings
from backfill.dispatch.pools import Pool, Start
from backfill.dispatch.watcher import EngineWatcher
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics
from backfill.policy.harvest import HarvestState
from tests.unit.test_pools import Endpoint, batch, lines


class Probe:
    def __init__(self, name: str, load: EngineLoad | None) -> None:
        self.name = name
        self.reading = load

    async def load(self) -> EngineLoad | None:
        return self.reading


def watcher_for(
    clock: list[float], backends_extra: dict[str, object] | None = None, **settings: object
) -> tuple[EngineWatcher, Pool, InteractiveMeter]:
    backend = {"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m"], "flavour": "vllm", "harvest": True}
    backend |= backends_extra or {}
    config = Settings(backends=[{**backend, "max_concurrency": 64}], **settings)  # type: ignore[arg-type]
    pool = Pool.build([Endpoint("a", 64)], {cfg.name: cfg for cfg in config.backends})
    metrics = Metrics()
    meter = InteractiveMeter(metrics)
    watcher = EngineWatcher(config, dict(pool.limits), {"m": pool}, lambda: clock[0], metrics, meter)
    return watcher, pool, meter


def test_the_ceiling_grows_while_the_engine_is_calm_and_the_pool_shows_harvesting() -> None:
    clock = [1_000.0]
    watcher, pool, _ = watcher_for(clock)
    watcher.probes = [Probe("a", EngineLoad(2, 0, 0.1, None, tokens=100))]  # type: ignore[list-item]
    for _ in range(3):
        assert [] == asyncio.run(watcher.tick())
        clock[0] += 1
    assert 6 == pool.limits["a"].ceiling  # 2 lines a tick (64 / 32)
    assert {"a": HarvestState.HARVESTING} == pool.harvest


def test_a_lasting_engine_queue_cuts_the_ceiling_and_returns_the_newest_lines() -> None:
    clock = [1_000.0]
    watcher, pool, _ = watcher_for(clock)
    calm, busy = EngineLoad(2, 0, 0.1, None), EngineLoad(4, 9, 0.9, None)
    watcher.probes = [Probe("a", calm)]  # type: ignore[list-item]
    for _ in range(4):
        asyncio.run(watcher.tick())
    pool.add(batch("b1", "t"), lines("b1", 8))
    starts = [pool.next_start(clock[0]) for _ in range(8)]
    assert sum(isinstance(s, Start) for s in starts) == 8
    watcher.probes = [Probe("a", busy)]  # type: ignore[list-item]
    assert [] == asyncio.run(watcher.tick())  # one reading: could be a burst between two iterations
    victims = asyncio.run(watcher.tick())
    assert 5 == pool.limits["a"].ceiling  # grown to 10, then halved
    assert 3 == len(victims)  # 8 in flight, the newest 3 go back
    assert {"a": HarvestState.THROTTLED} == pool.harvest


def test_a_promoted_batch_is_not_held_back() -> None:
    clock = [1_000.0]
    watcher, pool, _ = watcher_for(clock)
    watcher.probes = [Probe("a", EngineLoad(4, 9, 0.9, None))]  # type: ignore[list-item]
    pool.promoted.add("late")
    for _ in range(3):
        assert [] == asyncio.run(watcher.tick())
    assert pool.limits["a"].ceiling is None


def test_off_peak_windows_cap_the_ceiling_by_time_of_day() -> None:
    night = datetime(2026, 11, 25, 23, 0, tzinfo=UTC).timestamp()
    clock = [night]
    off_peak = [{"model": "m", "default_share": 0.25, "windows": [{"start": "22:00", "end": "06:00", "share": 1.0}]}]
    watcher, pool, _ = watcher_for(clock, off_peak=off_peak)
    watcher.probes = [Probe("a", None)]  # type: ignore[list-item]
    for _ in range(20):
        asyncio.run(watcher.tick())
        clock[0] += 1
    assert 40 == pool.limits["a"].ceiling  # the night allows all 64; growth is what holds it
    clock[0] = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
    asyncio.run(watcher.tick())
    assert 16 == pool.limits["a"].ceiling  # a quarter of 64 by day
    assert {"a": HarvestState.OFF_PEAK_CAP} == pool.harvest


def test_the_proxy_s_interactive_ttft_reaches_the_controller() -> None:
    clock = [1_000.0]
    watcher, _, meter = watcher_for(clock)
    watcher.probes = []
    meter.record_start("a")
    meter.record_first_token("a", 0.2)
    asyncio.run(watcher.tick())
    assert [] == meter.drain_ttft("a")  # drained by the tick
    controller = watcher.harvested["a"].controller
    assert 1 == len(controller._clean)  # measured while no batch line ran: a baseline sample


class OtherWorker:
    """The share function as the database answers it: one more worker on backend "a", its counter rising."""

    def __init__(self, tokens_per_tick: int) -> None:
        self.tokens_per_tick = tokens_per_tick
        self.counter = 0
        self.published: list[dict[str, int]] = []

    async def __call__(self, mine: dict[str, int]) -> dict[str, dict[str, int]]:
        self.published.append(dict(mine))
        self.counter += self.tokens_per_tick
        return {"a": {"worker-2": self.counter}}


def test_another_worker_s_batch_tokens_count_as_batch_and_it_takes_half_the_ceiling() -> None:
    clock = [1_000.0]
    capacity = {"capacity_tokens_per_s": 10_000.0}
    watcher, pool, _ = watcher_for(clock, backends_extra=capacity)
    other = OtherWorker(tokens_per_tick=5_000)
    watcher.share = other
    engine_tokens = 0
    for _ in range(40):  # the engine serves 5,000 tokens/s, all of them the other worker's batch lines
        engine_tokens += 5_000
        watcher.probes = [Probe("a", EngineLoad(8, 0, 0.1, None, tokens=engine_tokens))]  # type: ignore[list-item]
        asyncio.run(watcher.tick())
        clock[0] += 1

    controller = watcher.harvested["a"].controller
    assert 1.0 == controller.share  # no interactive load: taken as 50% interactive, the share would be 0.375
    assert math.ceil(controller.current / 2) == pool.limits["a"].ceiling  # two workers split the endpoint
    assert {"a": 0} == other.published[-1]  # what this worker sent there, for the others


def test_without_other_workers_the_ceiling_is_the_whole_endpoint_s() -> None:
    clock = [1_000.0]
    watcher, pool, _ = watcher_for(clock)

    async def alone(mine: dict[str, int]) -> dict[str, dict[str, int]]:
        return {}

    watcher.share = alone
    watcher.probes = [Probe("a", EngineLoad(2, 0, 0.1, None, tokens=100))]  # type: ignore[list-item]
    for _ in range(3):
        asyncio.run(watcher.tick())
        clock[0] += 1
    assert 6 == pool.limits["a"].ceiling
