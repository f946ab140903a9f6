"""SharedResult's quantiles over a window of send times (bench/harvest.py's windows table)."""

from __future__ import annotations

import math

from backfill.sim.shared_engine import SharedResult


def result(ttfts: list[float], sent: list[float]) -> SharedResult:
    return SharedResult("backfill", 600.0, ttfts, sent, 0, 0, 0, 0)


def test_a_window_counts_only_the_requests_sent_in_it() -> None:
    slow_then_fast = result([5.0, 4.0, 0.1, 0.2, 0.3], [0.0, 10.0, 300.0, 310.0, 599.0])

    assert 5.0 == slow_then_fast.ttft_quantile(0.99)
    assert 5.0 == slow_then_fast.ttft_quantile(0.99, 0.0, 300.0)
    assert 0.3 == slow_then_fast.ttft_quantile(0.99, 300.0, 600.0)  # from `since` on, up to `until` excluded
    assert 0.1 == slow_then_fast.ttft_quantile(0.0, 300.0, 600.0)


def test_an_empty_window_has_no_quantile() -> None:
    assert math.isnan(result([1.0], [0.0]).ttft_quantile(0.5, 100.0, 200.0))
