"""The harvest part of the dispatch core: readings in, ceilings and lines to hand back out. And the watcher that
gathers the readings."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from backfill.backends.engine_metrics import EngineMetrics
from backfill.config import Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import EngineRead, SetCeiling
from backfill.core.harvest import Harvest
from backfill.core.pool import Pool, Start
from backfill.dispatch.watcher import EngineWatcher
from backfill.domain.engine_load import EngineLoad
from backfill.domain.usage_report import Capacity
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics
from backfill.policy.harvest import HarvestState
from backfill.testing import InMemoryStore
from tests.unit.test_pools import Endpoint, batch, lines


def next_start(pool: Pool, now: float) -> Start | float:
    """The pool's next start when it is one line (these tests' batches are chat batches), or when to look again."""
    got = pool.next_start(now)
    if isinstance(got, list):
        assert 1 == len(got)
        return got[0]
    return got


def harvest_for(backends_extra: dict[str, object] | None = None, **settings: object) -> tuple[Harvest, Pool]:
    backend = {"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m"], "flavour": "vllm", "harvest": True}
    backend |= backends_extra or {}
    config = Settings(backends=[{**backend, "max_concurrency": 64}], **settings)  # type: ignore[arg-type]
    pool = Pool.build([Endpoint("a", 64)], {cfg.name: cfg for cfg in config.backends})
    return Harvest(config, dict(pool.limits), {"m": pool}), pool


def read(
    harvest: Harvest,
    now: float,
    load: EngineLoad | None,
    ttft: list[float] | None = None,
    others: Mapping[str, int] | None = None,
) -> list[Start]:
    _, victims = harvest.read(now, {"a": load}, {"a": ttft or []}, {"a": others or {}})
    return victims


def test_the_ceiling_grows_while_the_engine_is_calm_and_the_pool_shows_harvesting() -> None:
    harvest, pool = harvest_for()
    for t in range(3):
        assert [] == read(harvest, 1_000.0 + t, EngineLoad(2, 0, 0.1, None, tokens=100))
    assert 6 == pool.limits["a"].ceiling  # 2 lines a tick (64 / 32)
    assert {"a": HarvestState.HARVESTING} == pool.harvest


def test_a_lasting_engine_queue_cuts_the_ceiling_and_returns_the_newest_lines() -> None:
    harvest, pool = harvest_for()
    calm, busy = EngineLoad(2, 0, 0.1, None), EngineLoad(4, 9, 0.9, None)
    for _ in range(4):
        read(harvest, 1_000.0, calm)
    pool.add(batch("b1", "t"), lines("b1", 8))
    starts = [next_start(pool, 1_000.0) for _ in range(8)]
    assert sum(isinstance(s, Start) for s in starts) == 8
    assert [] == read(harvest, 1_000.0, busy)  # one reading: could be a burst between two iterations
    victims = read(harvest, 1_000.0, busy)
    assert 5 == pool.limits["a"].ceiling  # grown to 10, then halved
    assert 3 == len(victims)  # 8 in flight, the newest 3 go back
    assert {"a": HarvestState.THROTTLED} == pool.harvest


def test_a_promoted_batch_is_not_held_back() -> None:
    harvest, pool = harvest_for()
    pool.promoted.add("late")
    for _ in range(3):
        assert [] == read(harvest, 1_000.0, EngineLoad(4, 9, 0.9, None))
    assert pool.limits["a"].ceiling is None


def test_off_peak_windows_cap_the_ceiling_by_time_of_day() -> None:
    night = datetime(2026, 11, 25, 23, 0, tzinfo=UTC).timestamp()
    off_peak = [{"model": "m", "default_share": 0.25, "windows": [{"start": "22:00", "end": "06:00", "share": 1.0}]}]
    harvest, pool = harvest_for(off_peak=off_peak)
    calm = EngineLoad(2, 0, 0.1, None)
    for t in range(20):
        read(harvest, night + t, calm)
    assert 40 == pool.limits["a"].ceiling  # the night allows all 64; growth is what holds it
    read(harvest, datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp(), calm)
    assert 16 == pool.limits["a"].ceiling  # a quarter of 64 by day
    assert {"a": HarvestState.OFF_PEAK_CAP} == pool.harvest


def test_interactive_ttft_measured_while_no_batch_line_runs_is_a_baseline_sample() -> None:
    harvest, _ = harvest_for()
    read(harvest, 1_000.0, None, ttft=[0.2])
    assert 1 == len(harvest.harvested["a"].controller._clean)


def test_another_worker_s_batch_tokens_count_as_batch_and_it_takes_half_the_ceiling() -> None:
    harvest, pool = harvest_for(backends_extra={"capacity_tokens_per_s": 10_000.0})
    engine_tokens = other = 0
    for t in range(40):  # the engine serves 5,000 tokens/s, all of them the other worker's batch lines
        engine_tokens += 5_000
        other += 5_000
        read(harvest, 1_000.0 + t, EngineLoad(8, 0, 0.1, None, tokens=engine_tokens), others={"worker-2": other})
    controller = harvest.harvested["a"].controller
    assert 1.0 == controller.share  # no interactive load: taken as 50% interactive, the share would be 0.375
    assert math.ceil(controller.current / 2) == pool.limits["a"].ceiling  # two workers split the endpoint
    assert {"a": 0} == harvest.counters()  # what this worker publishes for the others


def test_without_other_workers_the_ceiling_is_the_whole_endpoint_s() -> None:
    harvest, pool = harvest_for()
    for t in range(3):
        read(harvest, 1_000.0 + t, EngineLoad(2, 0, 0.1, None, tokens=100), others={})
    assert 6 == pool.limits["a"].ceiling


def watcher_for(role: str = "all") -> tuple[EngineWatcher, InMemoryStore, InteractiveMeter]:
    config = Settings(
        role=role,
        backends=[{"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m"], "flavour": "openai", "harvest": True}],
    )
    core = DispatchCore(config, [(Endpoint("a", 64), ["m"])])
    store, meter = InMemoryStore(), InteractiveMeter(Metrics())
    return EngineWatcher(config, core, store, "worker-1", lambda: 1_000.0, meter), store, meter


def test_the_watcher_brings_the_proxy_s_ttft_and_the_other_workers_counters_and_publishes_its_own() -> None:
    watcher, store, meter = watcher_for()
    meter.record_start("a")
    meter.record_first_token("a", 0.2)
    asyncio.run(store.share_batch_tokens("worker-2", {"a": 7}, 1_000.0, 5.0))

    reading = asyncio.run(watcher.read())

    assert ({"a": [0.2]}, {"a": {"worker-2": 7}}, {}) == (dict(reading.ttft), dict(reading.others), dict(reading.loads))
    assert {"a": {"worker-1": 0, "worker-2": 7}} == asyncio.run(store.share_batch_tokens("x", {}, 1_000.0, 5.0))
    assert [] == meter.drain_ttft("a")  # drained by the reading


def test_a_worker_publishes_its_lines_in_flight_for_api_replicas() -> None:
    watcher, store, _ = watcher_for(role="worker")
    watcher.core.limits["a"].in_flight = 3
    asyncio.run(watcher.read())
    assert 3 == asyncio.run(store.endpoint_reports(1_000.0, 5.0))["a"].in_flight


def test_a_worker_publishes_its_ceiling_the_engine_queue_and_the_baseline_for_the_dashboard() -> None:
    watcher, store, _ = watcher_for(role="worker")
    core = watcher.core
    core.handle(EngineRead({"a": EngineLoad(2, 4, 0.1, None)}, {}, {}), 1_000.0)  # the ceiling set at this reading

    asyncio.run(watcher.read())  # published at the next

    [report] = asyncio.run(store.endpoint_reports(1_000.0, 5.0)).values()
    assert (core.harvest.ceilings["a"], 4, True) == (report.ceiling, report.engine_waiting, report.up)
    assert core.harvest.ttft_baseline_s("a") == report.ttft_baseline_s


class Unreachable(InMemoryStore):
    async def share_batch_tokens(self, *args: object, **kwargs: object) -> dict[str, dict[str, int]]:
        raise ConnectionError("the database is down")


def test_a_failing_share_harvests_as_if_alone() -> None:
    watcher, _, _ = watcher_for()
    watcher.board = Unreachable()
    assert {} == dict(asyncio.run(watcher.read()).others)


def test_an_engine_whose_metrics_cannot_be_read_holds_batch_to_half_the_endpoint() -> None:
    harvest, pool = harvest_for({"harvest": "auto"})
    for t in range(40):
        read(harvest, 1_000.0 + t, None)  # scraped, unreadable
    assert 32 == pool.limits["a"].ceiling
    assert {"a": HarvestState.BLIND} == pool.harvest
    [(_, _, state)] = pool.outlooks(1_050.0, [batch("b1", "t", expires_at=100_000)], rate=0.0)
    assert "harvesting_blind" == state  # on the batch: `backfill status` says the engine is not watched


def test_harvest_auto_leaves_a_dedicated_endpoint_unbounded_and_its_batches_on_track() -> None:
    harvest, pool = harvest_for({"harvest": "auto"})
    for t in range(3):
        read(harvest, 1_000.0 + t, EngineLoad(2, 0, 0.1, None, tokens=100))
    assert pool.limits["a"].ceiling is None
    assert {} == pool.harvest  # nothing to say about interactive traffic there: on track
    read(harvest, 1_003.0, EngineLoad(2, 0, 0.1, None, tokens=200), ttft=[0.1])
    assert pool.limits["a"].ceiling == 64  # seen: harvested from the whole endpoint down, not from zero
    assert {"a": HarvestState.HARVESTING} == pool.harvest


def test_harvest_is_on_by_default_and_false_opts_out() -> None:
    backend = {"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m"]}
    assert Settings(backends=[backend]).backends[0].harvest == "auto"  # type: ignore[list-item]
    config = Settings(backends=[backend | {"harvest": False}])  # type: ignore[list-item]
    pool = Pool.build([Endpoint("a", 64)], {cfg.name: cfg for cfg in config.backends})
    assert {} == Harvest(config, dict(pool.limits), {"m": pool}).harvested


def test_unreadable_metrics_set_the_gauge_to_0_log_once_and_1_again_when_they_come_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = {"status": 404}
    text = (Path(__file__).parents[1] / "fixtures" / "metrics" / "llamacpp.txt").read_bytes()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(served["status"], content=text if served["status"] == 200 else b"not found")

    config = Settings(
        backends=[{"name": "a", "url": "http://engine/v1", "models": ["m"], "flavour": "llamacpp", "harvest": True}]
    )
    core = DispatchCore(config, [(Endpoint("a", 64), ["m"])])
    metrics = Metrics()
    watcher = EngineWatcher(config, core, InMemoryStore(), "w", lambda: 1_000.0, metrics=metrics)

    async def rounds(n: int) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            probes = [EngineMetrics(cfg, client) for cfg in config.backends]
            for _ in range(n):
                await watcher.read(probes)

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("backfill_engine_metrics_readable", {"backend": "a"})

    asyncio.run(rounds(3))
    assert 0.0 == gauge()
    assert 1 == capsys.readouterr().out.count("backend.metrics_unreadable")
    served["status"] = 200
    asyncio.run(rounds(2))
    assert 1.0 == gauge()
    assert 1 == capsys.readouterr().out.count("backend.metrics_readable")


# --- the capacity each line runs in (the usage report's harvested / off-peak / promoted / dedicated) -----------


def test_lines_on_a_harvested_endpoint_run_in_harvested_capacity() -> None:
    harvest, pool = harvest_for()
    read(harvest, 1_000.0, EngineLoad(2, 0, 0.1, None))
    pool.add(batch("b1", "t"), lines("b1", 1))

    start = next_start(pool, 1_000.0)

    assert isinstance(start, Start)
    assert Capacity.HARVESTED == start.capacity


def test_a_promoted_batchs_lines_run_in_promoted_capacity() -> None:
    harvest, pool = harvest_for()
    pool.promoted.add("b1")
    read(harvest, 1_000.0, EngineLoad(2, 0, 0.1, None))
    pool.add(batch("b1", "t"), lines("b1", 1))

    start = next_start(pool, 1_000.0)

    assert isinstance(start, Start)
    assert Capacity.PROMOTED == start.capacity


def test_an_endpoint_batch_has_to_itself_is_dedicated_capacity() -> None:
    harvest, pool = harvest_for({"harvest": "auto"})
    read(harvest, 1_000.0, EngineLoad(2, 0, 0.1, None))
    pool.add(batch("b1", "t"), lines("b1", 1))

    start = next_start(pool, 1_000.0)

    assert isinstance(start, Start)
    assert Capacity.DEDICATED == start.capacity


def test_inside_an_off_peak_window_lines_run_in_off_peak_capacity() -> None:
    night = {"model": "m", "windows": [{"start": "00:00", "end": "23:59", "share": 1.0}]}
    harvest, pool = harvest_for(off_peak=[night])
    read(harvest, 1_000.0, EngineLoad(2, 0, 0.1, None))
    pool.add(batch("b1", "t"), lines("b1", 1))

    start = next_start(pool, 1_000.0)

    assert isinstance(start, Start)
    assert Capacity.OFF_PEAK == start.capacity


def test_the_core_tells_the_ceiling_with_the_ttft_baseline_it_holds_batch_to_once_learned() -> None:
    config = Settings(
        backends=[{"name": "a", "url": "http://127.0.0.1:9/v1", "models": ["m"], "flavour": "vllm", "harvest": True}]
    )
    core = DispatchCore(config, [(Endpoint("a", 64), ["m"])])
    unlearned = core.handle(EngineRead({"a": None}, {"a": []}, {}), 1_000.0)
    clean = [0.1] * 50 + [0.2] * 50  # measured while no batch line runs: baseline samples

    learned = core.handle(EngineRead({"a": None}, {"a": clean}, {}), 1_001.0)

    assert [None] == [action.ttft_baseline_s for action in unlearned if isinstance(action, SetCeiling)]
    [baseline] = [action.ttft_baseline_s for action in learned if isinstance(action, SetCeiling)]
    assert baseline is not None
    assert 0.1 <= baseline <= 0.2
