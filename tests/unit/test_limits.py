"""Endpoint limits: token buckets, Retry-After, adaptive concurrency; routing to the least loaded endpoint."""

from __future__ import annotations

import math

from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.policy.limits import AdaptiveConcurrency, EndpointLimits, TokenBucket, is_overload
from backfill.policy.routing import next_start_at, pick_endpoint

OK = Outcome(OutcomeKind.SUCCESS, 200)


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0)
    assert 0.0 == bucket.ready_at(0.0, 4)
    bucket.take(0.0, 4)
    assert 1.5 == bucket.ready_at(0.0, 3)
    assert 4.0 == TokenBucket(2.0, 4.0, level=0.0).ready_at(100.0, 4) - 100.0 + 4.0  # full again after 2 s


def test_a_request_bigger_than_the_burst_waits_for_a_full_bucket_only() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=10.0)
    assert 0.0 == bucket.ready_at(0.0, 1000)
    bucket.take(0.0, 1000)
    assert 1000.0 == bucket.ready_at(0.0, 1000)


def test_requests_per_minute_space_out_starts() -> None:
    limits = EndpointLimits(max_concurrency=100, rpm=60, adaptive=False)  # burst 10, then one a second
    now = 0.0
    for _ in range(10):
        assert now == limits.start_at(now, 1)
        limits.on_start(now, 1)
    assert 1.0 == limits.start_at(now, 1)


def test_tokens_per_minute_hold_back_a_large_request() -> None:
    limits = EndpointLimits(max_concurrency=100, tpm=6000, adaptive=False)  # 100 tokens/s, burst 1000
    limits.on_start(0.0, 1000)
    assert 5.0 == limits.start_at(0.0, 500)


def test_concurrency_full_means_wait_for_a_finish() -> None:
    limits = EndpointLimits(max_concurrency=2, adaptive=False)
    limits.on_start(0.0, 1)
    limits.on_start(0.0, 1)
    assert math.inf == limits.start_at(0.0, 1)
    limits.on_finish(1.0, 1.0, OK, 10)
    assert 1.0 == limits.start_at(1.0, 1)


def test_retry_after_pauses_the_endpoint() -> None:
    limits = EndpointLimits(max_concurrency=4, adaptive=False)
    limits.on_start(0.0, 1)
    limits.on_finish(0.0, 0.1, Outcome(OutcomeKind.HTTP_ERROR, 429, retry_after_s=7.0), 0)
    assert 7.0 == limits.start_at(0.0, 1)


def test_overload_is_429_5xx_timeouts_not_bad_requests() -> None:
    assert is_overload(Outcome(OutcomeKind.HTTP_ERROR, 429))
    assert is_overload(Outcome(OutcomeKind.HTTP_ERROR, 503))
    assert is_overload(Outcome(OutcomeKind.TIMEOUT))
    assert not is_overload(Outcome(OutcomeKind.HTTP_ERROR, 400))
    assert not is_overload(OK)


def drive(limit: AdaptiveConcurrency, capacity: float, seconds: float, base_latency: float = 1.0) -> None:
    """A closed loop against a server that serves at most `capacity` lines/s: below that, latency holds at
    `base_latency`; above, the extra lines queue (Little's law), so throughput stays at capacity."""
    now = owed = 0.0
    step = 0.05
    while now < seconds:
        in_flight = limit.current
        throughput = min(in_flight / base_latency, capacity)
        latency = in_flight / throughput
        owed += throughput * step
        while owed >= 1:
            owed -= 1
            limit.on_start(now, in_flight)
            limit.on_finish(now, latency, tokens=100, overloaded=False)
        now += step


def test_adaptive_concurrency_grows_to_the_knee_and_not_far_past_it() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=8)
    drive(limit, capacity=200.0, seconds=120)
    # The knee is 200 in flight (200 lines/s x 1 s); slow start leaves at 3x the latency floor, 600 in flight.
    assert 200 <= limit.current <= 3 * 200 * 1.1


def test_adaptive_concurrency_stops_at_the_operator_ceiling() -> None:
    limit = AdaptiveConcurrency(max_limit=64, initial=8)
    drive(limit, capacity=1000.0, seconds=60)
    assert 64 == limit.current


def test_overload_cuts_multiplicatively() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=100)
    limit.on_start(0.0, 100)
    limit.on_finish(0.1, 1.0, tokens=0, overloaded=True)
    assert 70 == limit.current


def test_demand_below_the_limit_teaches_nothing() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=50)
    for i in range(200):
        limit.on_start(i * 0.05, 3)  # only 3 in flight: the limit is not what paces the work
        limit.on_finish(i * 0.05, 0.2, tokens=10, overloaded=False)
    assert 50 == limit.current


def test_least_loaded_endpoint_takes_the_line() -> None:
    endpoints = {"a": EndpointLimits(4, adaptive=False), "b": EndpointLimits(4, adaptive=False)}
    endpoints["a"].on_start(0.0, 1)
    assert "b" == pick_endpoint(0.0, endpoints, 1)
    endpoints["b"].on_start(0.0, 1)
    endpoints["b"].on_start(0.0, 1)
    assert "a" == pick_endpoint(0.0, endpoints, 1)


def test_a_larger_endpoint_takes_proportionally_more() -> None:
    endpoints = {"slow": EndpointLimits(2, adaptive=False), "fast": EndpointLimits(4, adaptive=False)}
    for _ in range(6):
        name = pick_endpoint(0.0, endpoints, 1)
        assert name is not None
        endpoints[name].on_start(0.0, 1)
    assert (2, 4) == (endpoints["slow"].in_flight, endpoints["fast"].in_flight)
    assert pick_endpoint(0.0, endpoints, 1) is None


def test_next_start_is_the_earliest_over_endpoints() -> None:
    endpoints = {"a": EndpointLimits(1, adaptive=False), "b": EndpointLimits(1, rpm=6, adaptive=False)}
    endpoints["a"].on_start(0.0, 1)
    endpoints["b"].on_start(0.0, 1)
    endpoints["b"].on_finish(0.0, 0.0, OK, 1)
    assert 10.0 == next_start_at(0.0, endpoints, 1)  # b's bucket (burst 1) refills one request in 10 s
