"""A pool's books: what to lease, what to start where, what a finish gives back, and its outlooks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from backfill.config import BackendSettings
from backfill.core.pool import Pool, Start, ThroughputMeter
from backfill.domain.leases import DispatchBatch, LeasedLine
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.policy.limits import EndpointLimits


def next_start(pool: Pool, now: float) -> Start | float:
    """The pool's next start when it is one line (these tests' batches are chat batches), or when to look again."""
    got = pool.next_start(now)
    if isinstance(got, list):
        assert 1 == len(got)
        return got[0]
    return got


@dataclass(frozen=True)
class Endpoint:
    name: str
    max_concurrency: int = 2


def batch(batch_id: str, tenant: str, *, expires_at: int = 10_000, open_lines: int = 10, seq: int = 0) -> DispatchBatch:
    return DispatchBatch(
        batch_id, tenant, "m", "/v1/chat/completions", expires_at, "k", 0, seq, 1.0, open_lines, 1000, 500, 10
    )


def lines(batch_id: str, count: int, start: int = 1) -> list[LeasedLine]:
    return [LeasedLine(start + i, batch_id, start + i, f"c{i}", 0, 1, 0, 1, 100, 50) for i in range(count)]


def pool(*endpoints: Endpoint) -> Pool:
    return Pool.build(endpoints, {})


def test_in_process_engines_get_fixed_limits_and_configured_servers_adaptive_ones() -> None:
    configured = {"srv": BackendSettings(name="srv", url="http://x", models=["m"], max_concurrency=100, rpm=60)}
    built = Pool.build([Endpoint("engine", 8), Endpoint("srv")], configured)
    assert (False, 8) == (built.limits["engine"].adaptive, built.limits["engine"].limit)
    assert (True, 16) == (built.limits["srv"].adaptive, built.limits["srv"].limit)
    assert built.limits["srv"].requests is not None


def test_lease_targets_share_two_rounds_of_capacity_and_top_up_at_half() -> None:
    p = pool(Endpoint("a", 4))
    assert 8 == p.lease_wanted("b1", active_batches=1)
    assert 4 == p.lease_wanted("b1", active_batches=2)
    p.add(batch("b1", "t"), lines("b1", 5))
    assert 0 == p.lease_wanted("b1", active_batches=1)  # 5 of 8 buffered: more than half
    p.ready["b1"].popleft()
    p.ready["b1"].popleft()
    assert 5 == p.lease_wanted("b1", active_batches=1)


def test_starts_go_to_the_least_loaded_endpoint_until_all_are_full() -> None:
    p = pool(Endpoint("a", 1), Endpoint("b", 1))
    p.add(batch("b1", "t"), lines("b1", 3))
    first, second = next_start(p, 0.0), next_start(p, 0.0)
    assert isinstance(first, Start)
    assert isinstance(second, Start)
    assert {"a", "b"} == {first.endpoint, second.endpoint}
    assert math.inf == next_start(p, 0.0)
    p.finish(first, 1.0, 1.0, Outcome(OutcomeKind.SUCCESS, 200, usage=Usage(100, 0, 50)))
    third = next_start(p, 1.0)
    assert isinstance(third, Start)
    assert first.endpoint == third.endpoint


def test_a_newcomer_gets_the_freed_slots_until_it_has_its_share() -> None:
    p = pool(Endpoint("a", 4))
    p.add(batch("big", "t1"), lines("big", 20))
    starts = [next_start(p, 0.0) for _ in range(4)]
    assert all(isinstance(s, Start) and s.batch.id == "big" for s in starts)
    p.add(batch("small", "t2", seq=1), lines("small", 5, start=100))
    freed = []
    for running in starts[:2]:
        assert isinstance(running, Start)
        p.finish(running, 1.0, 1.0, Outcome(OutcomeKind.SUCCESS, 200))
        nxt = next_start(p, 1.0)
        assert isinstance(nxt, Start)
        freed.append(nxt.batch.id)
    assert ["small", "small"] == freed


def test_release_gives_the_slot_back_without_teaching_the_limit() -> None:
    p = pool(Endpoint("a", 1))
    p.add(batch("b1", "t"), lines("b1", 2))
    start = next_start(p, 0.0)
    assert isinstance(start, Start)
    p.release(start)
    assert ({}, 0) == (p.tenant_in_flight, p.limits["a"].in_flight)
    assert isinstance(next_start(p, 0.0), Start)


def test_batch_tokens_count_a_prompt_from_its_start_and_the_output_at_the_finish() -> None:
    p = pool(Endpoint("a", 4))
    p.add(batch("b1", "t"), lines("b1", 2))  # 100 prompt tokens estimated each
    first, second = next_start(p, 0.0), next_start(p, 0.0)
    assert isinstance(first, Start)
    assert isinstance(second, Start)
    assert 200 == p.limits["a"].served_tokens  # the engine prefills a prompt as soon as it arrives
    p.finish(first, 5.0, 5.0, Outcome(OutcomeKind.SUCCESS, 200, usage=Usage(120, 0, 30)))
    assert 200 + 20 + 30 == p.limits["a"].served_tokens  # the prompt as reported, and the output
    p.release(second)  # aborted: counted again when it is sent again
    assert 150 == p.limits["a"].served_tokens


def test_a_shared_endpoint_starts_nothing_before_its_controller_has_read_it() -> None:
    configured = {"srv": BackendSettings(name="srv", url="http://x", models=["m"], harvest=True)}
    built = Pool.build([Endpoint("srv")], configured)
    built.add(batch("b1", "t"), lines("b1", 2))
    assert 0 == built.limits["srv"].ceiling
    assert math.inf == next_start(built, 0.0)


def test_rate_limits_say_when_to_look_again() -> None:
    p = Pool({"a": EndpointLimits(10, rpm=6, adaptive=False)})  # burst of 1
    p.add(batch("b1", "t"), lines("b1", 3))
    assert isinstance(next_start(p, 0.0), Start)
    assert 10.0 == next_start(p, 0.0)


def test_the_meter_reports_the_lower_of_now_and_lately() -> None:
    meter = ThroughputMeter()
    meter.sample(0.0, busy=True)
    meter.add(1000.0)
    meter.sample(10.0, busy=True)
    assert 100.0 == meter.rate
    meter.add(10_000.0)
    meter.sample(20.0, busy=True)  # a burst: the fast average jumps, the slow one barely moves
    assert meter.fast > meter.slow == meter.rate
    idle_since = ThroughputMeter()
    idle_since.sample(0.0, busy=False)
    assert 0.0 == idle_since.rate


def test_outlooks_promote_a_batch_that_cannot_wait_its_turn() -> None:
    p = pool(Endpoint("a", 4))
    p.meter.fast = p.meter.slow = 100.0  # line cost per second
    relaxed = batch("relaxed", "t1", expires_at=1_000_000, open_lines=10)
    tight = batch("tight", "t2", expires_at=3600, open_lines=1400)  # 1,400 lines x 250: 3,500 s alone
    shown = {batch_id: (eta, state) for batch_id, eta, state in p.outlooks(0.0, [relaxed, tight])}
    assert "on_track" == shown["relaxed"][1]
    assert "promoted" == shown["tight"][1]
    assert {"tight"} == p.promoted
    hopeless = batch("hopeless", "t3", expires_at=600, open_lines=400)  # 1,000 s alone
    assert ("hopeless", pytest.approx(1000, abs=1), "at_risk") == p.outlooks(0.0, [hopeless])[0]


def test_outlooks_at_the_rate_of_every_worker_together() -> None:
    p = pool(Endpoint("a", 4))
    p.meter.fast = p.meter.slow = 100.0  # this worker's share; three more serve the same pool as fast
    tight = batch("tight", "t2", expires_at=3600, open_lines=1400)  # 3,500 s for one worker, 875 s for four

    ((_, eta, state),) = p.outlooks(0.0, [tight], rate=400.0)

    assert (pytest.approx(875, abs=1), "on_track") == (eta, state)
    assert set() == p.promoted


def test_no_rate_no_outlook() -> None:
    assert [("b1", None, None)] == pool(Endpoint("a")).outlooks(0.0, [batch("b1", "t")])


def test_a_ceiling_cut_sheds_the_newest_lines_that_have_done_little_work() -> None:
    p = pool(Endpoint("a", 6))
    p.add(batch("b1", "t"), lines("b1", 6))
    starts = [next_start(p, float(t)) for t in range(6)]  # started at 0, 1, ..., 5
    assert all(isinstance(s, Start) for s in starts)
    assert [] == p.shed(5.0)  # no ceiling: nothing to shed
    p.limits["a"].ceiling = 2
    shed = p.shed(5.0, max_age_s=2.5)
    assert [6, 5, 4] == [s.line.id for s in shed]  # newest first; lines 1-3 are older than 2.5 s and stay
    assert [] == p.shed(5.0, max_age_s=2.5)  # already handed back: not shed twice
    for victim in shed:
        p.release(victim)
    assert (3, math.inf) == (p.limits["a"].in_flight, next_start(p, 5.0))  # 3 in flight over a ceiling of 2


def test_a_zero_ceiling_stops_every_start() -> None:
    p = pool(Endpoint("a", 4))
    p.add(batch("b1", "t"), lines("b1", 2))
    p.limits["a"].ceiling = 0
    assert math.inf == next_start(p, 0.0)
    p.limits["a"].ceiling = None
    assert isinstance(next_start(p, 0.0), Start)


def test_outlooks_say_throttled_or_harvesting_when_every_endpoint_is_shared() -> None:
    from backfill.policy.harvest import HarvestState

    p = pool(Endpoint("a", 4), Endpoint("b", 4))
    p.meter.fast = p.meter.slow = 100.0
    relaxed = batch("relaxed", "t1", expires_at=1_000_000)
    p.harvest["a"] = HarvestState.THROTTLED
    assert "on_track" == p.outlooks(0.0, [relaxed])[0][2]  # b is dedicated to batch work
    p.harvest["b"] = HarvestState.THROTTLED
    assert "throttled" == p.outlooks(0.0, [relaxed])[0][2]
    p.harvest["b"] = HarvestState.OFF_PEAK_CAP
    assert "off_peak" == p.outlooks(0.0, [relaxed])[0][2]
    p.harvest["a"] = HarvestState.HARVESTING
    assert "harvesting" == p.outlooks(0.0, [relaxed])[0][2]


def test_a_throttled_batch_says_so_before_any_estimate() -> None:
    from backfill.policy.harvest import HarvestState

    p = pool(Endpoint("a", 4))
    p.harvest["a"] = HarvestState.THROTTLED
    assert [("b1", None, "throttled")] == p.outlooks(0.0, [batch("b1", "t")])
