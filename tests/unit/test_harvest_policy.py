from datetime import UTC, datetime, time

import pytest

from backfill.policy.harvest import HarvestController, HarvestState, OffPeak, Signals, Window


def calm(ttft: float = 0.1, batch: int = 4) -> Signals:
    return Signals(interactive_ttft_s=[ttft] * 10, engine_waiting=0, batch_in_flight=batch)


def with_baseline(controller: HarvestController, ttft: float = 0.1) -> HarvestController:
    """Feed one tick of interactive TTFT measured with no batch line running: the baseline's samples."""
    controller.tick(-1.0, Signals(interactive_ttft_s=[ttft] * controller.min_clean, batch_in_flight=0))
    controller.limit = controller._aimd = 0.0
    return controller


def test_grows_additively_from_zero_while_nothing_says_otherwise() -> None:
    controller = HarvestController(max_limit=64, step=4)
    limits = [controller.tick(float(t), Signals()) for t in range(5)]
    assert limits == [4, 8, 12, 16, 20]
    assert controller.state is HarvestState.HARVESTING
    assert not controller.shed


def test_never_exceeds_the_endpoint_ceiling() -> None:
    controller = HarvestController(max_limit=10, step=4)
    for t in range(10):
        controller.tick(float(t), calm())
    assert controller.current == 10


def test_cuts_multiplicatively_when_interactive_ttft_rises_past_its_baseline() -> None:
    controller = with_baseline(HarvestController(max_limit=64, step=8, recent_s=1.0))
    for t in range(6):
        controller.tick(float(t), calm(0.100))
    assert controller.current == 48
    controller.tick(6.0, calm(0.109))  # within 10% of the 100 ms baseline: still growing
    assert controller.current == 56
    controller.tick(7.0, calm(0.130))
    assert controller.current == 28
    assert controller.shed
    assert controller.state is HarvestState.THROTTLED
    controller.tick(8.0, Signals(batch_in_flight=28))  # no new samples since the cut: no second verdict
    assert controller.current == 36
    assert not controller.shed


def test_without_a_baseline_interactive_latency_is_not_judged() -> None:
    controller = HarvestController(max_limit=64, step=8, recent_s=1.0)
    controller.tick(0.0, calm(0.1))
    controller.tick(1.0, calm(5.0))
    assert controller.current == 16
    assert controller.baseline_s is None


def test_the_baseline_is_a_high_quantile_of_ttft_with_no_batch_running() -> None:
    controller = HarvestController(max_limit=64, min_clean=100)
    samples = [0.05] * 98 + [0.5, 0.6]
    controller.tick(0.0, Signals(interactive_ttft_s=samples, batch_in_flight=0))
    controller.tick(1.0, Signals(interactive_ttft_s=[9.0] * 50, batch_in_flight=3))  # with batch: not baseline
    assert controller.baseline_s == 0.6


def test_floor_is_zero() -> None:
    controller = with_baseline(HarvestController(max_limit=64, step=2, recent_s=1.0))
    controller.tick(0.0, calm(0.1))
    for t in range(1, 10):
        controller.tick(float(t), calm(1.0))
    assert controller.current == 0


def test_a_queue_in_the_engine_cuts_only_when_seen_twice_in_a_row() -> None:
    controller = HarvestController(max_limit=64, step=16)
    controller.tick(0.0, Signals(engine_waiting=0))
    controller.tick(1.0, Signals(engine_waiting=0))
    assert controller.current == 32
    controller.tick(2.0, Signals(engine_waiting=5))  # one reading: a burst between two iterations
    assert controller.current == 48
    controller.tick(3.0, Signals(engine_waiting=4))
    assert controller.current == 24
    assert controller.cuts == 1


def test_one_or_two_waiting_requests_are_arrivals_between_iterations_not_congestion() -> None:
    controller = HarvestController(max_limit=64, step=16)
    for t in range(6):
        controller.tick(float(t), Signals(engine_waiting=2))
    assert controller.cuts == 0
    assert controller.current == 64


def tokens(engine: int, batch: int = 0, waiting: int = 0) -> Signals:
    return Signals(engine_tokens=engine, batch_tokens=batch, engine_waiting=waiting, batch_in_flight=1)


def test_batch_takes_the_whole_endpoint_below_fill_below_nothing_from_the_target_on_and_a_line_between() -> None:
    controller = HarvestController(
        max_limit=64, step=64, target=0.8, fill_below=0.4, capacity_tokens_per_s=10_000, rate_window_s=10
    )
    for t in range(12):  # 4,000 tokens/s in the engine, 1,000 of them ours: interactive uses 30% of the capacity
        controller.tick(float(t), tokens(4_000, batch=1_000))
    assert controller.share == 1.0
    assert controller.current == 64
    for t in range(12, 400):  # interactive at 60%, long enough for the estimate to come down to it
        controller.tick(float(t), tokens(7_000, batch=1_000))
    assert controller.share == pytest.approx((0.8 - 0.6) / (0.8 - 0.4), abs=0.01)
    assert controller.current == 32
    assert controller.state is HarvestState.THROTTLED
    for t in range(400, 412):  # interactive load past the target: no batch at all
        controller.tick(float(t), tokens(9_000, batch=0))
    assert controller.current == 0


def test_the_interactive_load_estimate_rises_at_once_and_falls_back_slowly() -> None:
    controller = HarvestController(
        max_limit=64, step=64, target=0.8, fill_below=0.4, release_s=60, capacity_tokens_per_s=10_000, rate_window_s=2
    )
    for t in range(5):
        controller.tick(float(t), tokens(3_000))
    assert controller.share == 1.0
    for t in range(5, 9):  # a burst: interactive at 80%
        controller.tick(float(t), tokens(8_000))
    assert controller.share == 0.0
    for t in range(9, 30):  # the lull after it: 20 s later the estimate is still high
        controller.tick(float(t), tokens(3_000))
    assert 0.0 < controller.share < 0.5
    for t in range(30, 300):  # minutes of quiet: back to the whole endpoint
        controller.tick(float(t), tokens(3_000))
    assert controller.share == 1.0


def test_the_limit_rises_at_most_a_step_a_tick_whatever_lifts_it() -> None:
    controller = HarvestController(
        max_limit=64, step=4, fill_below=0.4, release_s=1, capacity_tokens_per_s=10_000, rate_window_s=2
    )
    for t in range(30):  # the interactive load keeps the ceiling near 0 while the AIMD limit grows to 64
        controller.tick(float(t), tokens(7_800))
    assert controller.current == 0
    controller.tick(30.0, tokens(1_000))
    controller.tick(31.0, tokens(1_000))  # the ceiling jumps to the whole endpoint
    assert controller.share == 1.0
    assert controller.current == 8  # 4 lines a tick, not 64 prompts at once


def test_fill_below_must_lie_below_the_target() -> None:
    with pytest.raises(ValueError, match="fill_below"):
        HarvestController(max_limit=8, target=0.5, fill_below=0.6)


def test_capacity_is_learned_from_what_the_engine_serves_while_requests_wait_in_it() -> None:
    controller = HarvestController(max_limit=64, rate_window_s=10)
    for t in range(12):
        controller.tick(float(t), tokens(5_000))
    assert controller.capacity is None  # never full: nothing learned, nothing held back
    assert controller.share is None
    for t in range(12, 120):  # a running average: the throughput varies with the mix while full
        controller.tick(float(t), tokens(8_000, waiting=5))
    assert controller.capacity == pytest.approx(8_000, rel=0.05)


def test_once_learned_the_capacity_is_never_below_what_the_engine_has_served() -> None:
    controller = HarvestController(max_limit=64, rate_window_s=10)
    for t in range(8):  # full after a ramp: the window still holds the ramp, the first estimate is low
        controller.tick(float(t), tokens(2_000 + 1_000 * t, waiting=5))
    learned = controller.capacity
    assert learned is not None
    assert learned < 9_000
    for t in range(8, 30):  # no queue, and more throughput than that estimate
        controller.tick(float(t), tokens(9_000))
    assert controller.capacity == pytest.approx(9_000)


def test_a_cap_holds_the_limit_and_says_why() -> None:
    controller = HarvestController(max_limit=64, step=16)
    for t in range(4):
        controller.tick(float(t), calm(), cap=12.8)
    assert controller.current == 12
    assert controller.state is HarvestState.OFF_PEAK_CAP


def test_only_lines_younger_than_twice_the_recent_median_ttft_are_shed() -> None:
    controller = HarvestController(max_limit=64, recent_s=10.0)
    assert controller.shed_age_s == 0.5  # nothing measured yet
    controller.tick(0.0, Signals(interactive_ttft_s=[0.1, 0.2, 0.3] * 5))
    assert controller.shed_age_s == pytest.approx(0.4)


def at(hour: int, minute: int = 0) -> float:
    return datetime(2026, 11, 25, hour, minute, tzinfo=UTC).timestamp()


def test_off_peak_windows_wrap_past_midnight_in_the_named_time_zone() -> None:
    night = OffPeak((Window(time(22), time(6), 1.0),), default=0.2, timezone="Europe/Berlin")  # UTC+1 in November
    assert night.share(at(21, 30)) == 1.0  # 22:30 in Berlin
    assert night.share(at(4, 59)) == 1.0  # 05:59
    assert night.share(at(5, 0)) == 0.2  # 06:00
    assert night.share(at(12)) == 0.2


def test_the_first_matching_window_wins_and_default_covers_the_rest() -> None:
    windows = (Window(time(9), time(17), 0.1), Window(time(0), time(23, 59), 0.5))
    assert OffPeak(windows, default=1.0).share(at(10)) == 0.1
    assert OffPeak(windows, default=1.0).share(at(20)) == 0.5
    assert OffPeak((), default=0.3).share(at(20)) == 0.3


def test_the_baseline_keeps_learning_one_noisy_quiet_period_cannot_switch_protection_off() -> None:
    controller = HarvestController(max_limit=64, step=8, recent_s=1.0, baseline_period_s=60.0)
    controller.tick(0.0, Signals(interactive_ttft_s=[4.0] * 60, batch_in_flight=0))  # a noisy quiet period
    assert controller.baseline_s == 4.0
    controller.tick(70.0, Signals(interactive_ttft_s=[0.1] * 60, batch_in_flight=0))  # a normal one, later
    assert controller.baseline_s == 0.1
    controller.tick(140.0, Signals(interactive_ttft_s=[0.1] * 10, batch_in_flight=0))  # closes the second period
    assert controller.baseline_s == 0.1  # the lowest period's quantile: the noisy one does not raise it again
    for t in range(141, 150):
        controller.tick(float(t), calm(0.1, batch=8))
    before = controller.current
    controller.tick(150.0, calm(1.0, batch=before))  # 10x the baseline with batch running: protection acts
    assert controller.shed
    assert controller.current < before


def test_the_baseline_forgets_periods_older_than_the_last_few() -> None:
    controller = HarvestController(max_limit=64, baseline_period_s=10.0, baseline_periods=2)
    controller.tick(0.0, Signals(interactive_ttft_s=[0.05] * 50, batch_in_flight=0))  # once, fast
    for n, t in enumerate((10.0, 20.0, 30.0)):  # then three periods at 0.2 s
        controller.tick(t, Signals(interactive_ttft_s=[0.2] * 50, batch_in_flight=0))
        if n == 0:
            assert controller.baseline_s == 0.05
    controller.tick(40.0, Signals())
    assert controller.baseline_s == pytest.approx(0.2)


def test_harvest_auto_gives_a_dedicated_endpoint_everything_until_interactive_traffic_shows_up() -> None:
    controller = HarvestController(max_limit=64, step=4, shared=False, capacity_tokens_per_s=1000.0)
    for t in range(40):  # batch alone: the engine's tokens are all ours
        assert controller.tick(float(t), Signals(engine_tokens=900, batch_tokens=900, engine_waiting=0)) == 64
    assert not controller.shared
    limit = controller.tick(40.0, Signals(interactive_ttft_s=[0.1], engine_waiting=0, batch_in_flight=64))
    assert controller.shared  # a request through the proxy: from now on it is harvested ...
    assert limit == 64  # ... from where it stands, not from zero
    for t in range(41, 80):  # ... and interactive load past the target leaves batch nothing
        controller.tick(float(t), Signals(engine_tokens=900, batch_tokens=0, engine_waiting=0))
    assert controller.current == 0


def test_harvest_auto_sees_interactive_traffic_that_bypasses_the_proxy_in_the_engine_s_counters() -> None:
    controller = HarvestController(max_limit=64, shared=False, capacity_tokens_per_s=1000.0)
    for t in range(20):
        controller.tick(float(t), Signals(engine_tokens=600, batch_tokens=300, engine_waiting=0))
    assert controller.shared  # 300 tokens/s not ours: 30% of the engine
    assert controller.state is HarvestState.HARVESTING


def test_an_engine_whose_metrics_cannot_be_read_is_harvested_blind_at_half_the_endpoint() -> None:
    controller = HarvestController(max_limit=64, step=64, shared=False)
    limits = [controller.tick(float(t), Signals(engine_unread=True)) for t in range(5)]
    assert limits == [32] * 5
    assert controller.shared
    assert controller.state is HarvestState.BLIND  # what users see: batch is held because the engine is unread
    with_baseline(controller)
    controller.tick(10.0, Signals(interactive_ttft_s=[0.1] * 10, engine_unread=True, batch_in_flight=4))
    assert controller.current == 32
    controller.tick(11.0, Signals(interactive_ttft_s=[1.0] * 10, engine_unread=True, batch_in_flight=32))
    assert controller.current == 16  # the proxy's TTFT still cuts below the blind share
