"""SharedResult: its quantiles over a window of send times (bench/harvest.py's windows table), and the tokens
`shared_engine.run` counts inside its measured window."""

from __future__ import annotations

import dataclasses
import math

from backfill.sim.profile import EngineProfile
from backfill.sim.shared_engine import SharedResult, TraceRequest, run


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


def test_tokens_count_as_the_engine_serves_them_inside_the_window_not_when_a_request_finishes() -> None:
    """As bench/harvest_e2e.py counts on the real path: the engine's counters over the window."""
    answer = 4_000  # tokens: nothing finishes in 3 s
    trace = [TraceRequest(at_s=0.0, prompt_tokens=300, output_tokens=answer)]

    measured = run("fifo", trace, EngineProfile(), scale=1.0, duration_s=3.0, backlog=8, warmup_s=1.0)

    assert 0 == measured.batch_lines
    # The interactive request's first token came before the window: only its later tokens count.
    assert 0 < measured.interactive_tokens < answer
    # Eight batch lines like it, each with its prompt and a token per iteration, alongside the interactive one.
    assert 7 * measured.interactive_tokens < measured.batch_output_tokens < 9 * measured.interactive_tokens
    assert measured.batch_tokens == measured.batch_output_tokens  # the prompts came before the window too


def test_an_interactive_prompt_counts_when_its_first_token_comes_out_in_the_window() -> None:
    trace = [TraceRequest(at_s=1.5, prompt_tokens=300, output_tokens=5)]

    measured = run("interactive", trace, EngineProfile(), scale=1.0, duration_s=3.0, warmup_s=1.0)

    assert 305 == measured.interactive_tokens


def test_a_request_still_unanswered_at_the_end_counts_as_what_it_has_waited() -> None:
    """As bench/harvest_e2e.py counts it on the real path; left out, the slowest requests would shorten the tail."""
    two_slots = dataclasses.replace(EngineProfile(), max_num_seqs=2)
    trace = [TraceRequest(at_s=1.5, prompt_tokens=300, output_tokens=4_000)]

    measured = run("fifo", trace, two_slots, scale=1.0, duration_s=3.0, backlog=4, warmup_s=1.0)

    assert [1.5] == measured.interactive_ttft_s  # queued behind the batch lines holding both slots
    assert 1.5 == measured.ttft_quantile(0.99)
