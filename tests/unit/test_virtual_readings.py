"""When virtual time reads the engines: once every `engine_metrics_interval_s`, from `probe_phase_s` after the first
batch arrives (on the real path the watcher's readings fall anywhere relative to the workload)."""

from __future__ import annotations

import pytest

from backfill.config import Settings
from backfill.domain.engine_load import EngineLoad
from backfill.sim.virtual import BatchSpec, LineSpec, VirtualDriver, sim_backend
from backfill.sim.virtual_engines import EventLoop, FluidEngine


class ReadEngine(FluidEngine):
    """A fluid engine that has /metrics, and notes when they are read."""

    def __init__(self, loop: EventLoop) -> None:
        super().__init__(loop, lambda t: 5_000.0)
        self.read_at: list[float] = []

    def load(self) -> EngineLoad:
        self.read_at.append(self.loop.now)
        return EngineLoad(0, 0, None, None, tokens=0)


@pytest.mark.parametrize("phase", [0.0, 0.25, 0.7])
def test_engines_are_read_once_a_second_from_the_phase_after_the_batch_arrives(phase: float) -> None:
    loop = EventLoop()
    engine = ReadEngine(loop)
    settings = Settings(backends=[sim_backend("a", 8, harvest=True)], engine_metrics_interval_s=1.0)
    driver = VirtualDriver(loop, {"a": engine}, settings, probe_phase_s=phase)
    driver.submit_at(BatchSpec("b1", "t", 2.0, 3600.0, [LineSpec(200, 100)] * 10_000))

    loop.run(until=6.0)

    assert [pytest.approx(2.0 + phase + k) for k in range(len(engine.read_at))] == engine.read_at
    assert len(engine.read_at) == (4 if phase else 5)  # 2.0 + phase, ... up to 6.0
