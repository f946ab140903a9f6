"""The real-time runner of the simulator: what it reports when its process is short of CPU."""

from __future__ import annotations

import time

from backfill.sim.engine import SimRequest
from backfill.sim.profile import EngineProfile
from backfill.sim.runner import EngineRunner


def lost_seconds(runner: EngineRunner) -> float:
    value = runner.metrics.registry.get_sample_value("backfill_sim_lost_seconds_total")
    assert value is not None
    return value


def block_the_loop(seconds: float) -> None:
    """What a process short of CPU does to the event loop: nothing on it runs meanwhile."""
    time.sleep(seconds)


async def test_time_the_engine_falls_behind_its_model_is_counted_and_not_made_up() -> None:
    runner = EngineRunner(EngineProfile())
    runner.start()
    try:
        events = runner.submit(SimRequest("r", 100, (), 20), every_token=True)
        first = await events.get()
        assert first is not None
        assert first.is_first_token
        block_the_loop(0.4)
        while (event := await events.get()) is not None and event.finish_reason is None:
            pass
    finally:
        await runner.stop()

    # Up to 50 ms of lag is made up by sleeping less; the rest of the 0.4 s is lost (less one iteration's sleep).
    assert lost_seconds(runner) > 0.3
