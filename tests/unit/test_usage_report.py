"""Usage, cost and SLA reports: rows folded into buckets, prices into line items, turnarounds into percentiles."""

from __future__ import annotations

import pytest

from backfill.domain.usage import Usage
from backfill.domain.usage_report import (
    Capacity,
    EndedBatch,
    Price,
    UsageCounts,
    UsageKey,
    UsageKind,
    Window,
    cost_buckets,
    fold,
    line_items,
    percentile,
    sla_buckets,
    usage_buckets,
)
from backfill.interactive_usage import StreamUsage, usage_in_body

DAY = 86_400
T0 = 1_700_006_400 // DAY * DAY  # a midnight, UTC


def _key(tenant: str, model: str, at: int, kind: UsageKind = UsageKind.BATCH) -> UsageKey:
    return UsageKey(tenant, model, at, kind)


def test_a_batch_lines_tokens_count_in_the_capacity_it_ran_in() -> None:
    counts = UsageCounts.of_request(Usage(10, 4, 5, 0), Capacity.HARVESTED)

    assert UsageCounts(1, 10, 4, 5, harvested_tokens=15) == counts


def test_an_interactive_request_has_no_capacity_share() -> None:
    assert UsageCounts(1, 10, 0, 5) == UsageCounts.of_request(Usage(10, 0, 5, 0))


@pytest.mark.parametrize(("capacity", "cached"), [(Capacity.HARVESTED, False), (None, False), (None, True)])
def test_counts_of_many_requests_are_the_sum_of_each_ones(capacity: Capacity | None, cached: bool) -> None:
    usages = [Usage(10, 4, 5, 1), Usage(3, 0, 7, 0), Usage(0, 0, 0, 0)]
    one_by_one = UsageCounts()
    for usage in usages:
        one_by_one = one_by_one + UsageCounts.of_request(usage, capacity, cached=cached)

    assert one_by_one == UsageCounts.of_requests(usages, capacity, cached=cached)
    assert Usage(13, 4, 12, 1) == Usage.total(usages)


def test_fold_sums_counts_with_the_same_key() -> None:
    key = _key("t", "m", T0)

    folded = fold([(key, UsageCounts(1, 2, 0, 3)), (key, UsageCounts(1, 5, 1, 1))])

    assert {key: UsageCounts(2, 7, 1, 4)} == folded


def test_buckets_cover_the_window_and_group_by_tenant_and_model() -> None:
    rows = [
        (_key("t1", "a", T0 + 60), UsageCounts(1, 10, 0, 1)),
        (_key("t1", "a", T0 + 3600), UsageCounts(2, 20, 0, 2)),
        (_key("t2", "a", T0 + 120, UsageKind.INTERACTIVE), UsageCounts(1, 5, 0, 5)),
        (_key("t1", "b", T0 + DAY + 60), UsageCounts(1, 1, 0, 1)),
    ]
    window = Window(T0, T0 + 2 * DAY, DAY, 7)

    buckets = usage_buckets(rows, window, ["project_id", "model"], {"t1": "research"})

    assert [(T0, T0 + DAY), (T0 + DAY, T0 + 2 * DAY)] == [(b.start_time, b.end_time) for b in buckets]
    first = {(r["project_id"], r["model"]): (r["num_model_requests"], r["input_tokens"]) for r in buckets[0].results}
    assert {("research", "a"): (3, 30), ("t2", "a"): (1, 5)} == first
    assert [("research", "b", None)] == [(r["project_id"], r["model"], r["batch"]) for r in buckets[1].results]


def test_ungrouped_results_sum_everything_and_say_null() -> None:
    rows = [
        (_key("t1", "a", T0), UsageCounts(1, 10, 2, 1)),
        (_key("t2", "b", T0, UsageKind.INTERACTIVE), UsageCounts(1, 5, 0, 5)),
    ]

    [bucket] = usage_buckets(rows, Window(T0, T0 + 3600, 3600, 24), [], {})

    [result] = bucket.results
    assert "organization.usage.completions.result" == result["object"]
    assert (2, 15, 2, 6) == (
        result["num_model_requests"],
        result["input_tokens"],
        result["input_cached_tokens"],
        result["output_tokens"],
    )
    assert (None, None, None) == (result["project_id"], result["model"], result["batch"])


def test_window_pages_by_limit() -> None:
    window = Window(T0, T0 + 10 * 3600, 3600, 4)

    assert [T0, T0 + 3600, T0 + 7200, T0 + 10800] == window.bucket_starts()
    assert T0 + 4 * 3600 == window.next_page()
    assert Window(T0 + 8 * 3600, T0 + 10 * 3600, 3600, 4).next_page() is None


def test_line_items_apply_the_batch_discount_and_the_cached_price() -> None:
    price = Price(input_per_million=2.0, output_per_million=8.0, cached_input_per_million=1.0)
    counts = UsageCounts(1, 1_000_000, 500_000, 1_000_000)

    items = line_items("m", counts, price, batch=True, batch_discount=0.5)

    assert {"m, input (batch)": 0.5, "m, cached input (batch)": 0.25, "m, output (batch)": 4.0} == items


def test_costs_sum_per_tenant_and_skip_models_without_a_price() -> None:
    rows = [
        (_key("t1", "priced", T0), UsageCounts(1, 1_000_000, 0, 0)),
        (_key("t1", "priced", T0, UsageKind.INTERACTIVE), UsageCounts(1, 1_000_000, 0, 0)),
        (_key("t1", "free", T0), UsageCounts(1, 1_000_000, 0, 0)),
    ]
    prices = {"priced": Price(1.0, 1.0)}

    [bucket] = cost_buckets(rows, Window(T0, T0 + DAY, DAY, 7), ["project_id"], {"t1": "research"}, prices, 0.5)

    [result] = bucket.results
    assert {"value": 1.5, "currency": "usd"} == result["amount"]
    assert ("research", None) == (result["project_id"], result["line_item"])


def test_percentile_is_nearest_rank() -> None:
    assert 50 == percentile(list(range(1, 101)), 50)
    assert 95 == percentile(list(range(1, 101)), 95)
    assert percentile([], 50) is None


def test_sla_counts_batches_in_window_and_expired_lines() -> None:
    ended = [
        EndedBatch("t1", "24h", "completed", T0, T0 + 100, T0 + DAY),
        EndedBatch("t1", "24h", "completed", T0, T0 + 300, T0 + DAY),
        EndedBatch("t1", "24h", "expired", T0, T0 + DAY, T0 + DAY, lines_expired=7),
        EndedBatch("t1", "1h", "completed", T0, T0 + 50, T0 + 3600),
    ]

    [bucket] = sla_buckets(ended, Window(T0, T0 + 2 * DAY, 2 * DAY, 7), ["completion_window"], {})

    by_window = {r["completion_window"]: r for r in bucket.results}
    day = by_window["24h"]
    counts = (day["batches_ended"], day["batches_in_window"], day["batches_expired"], day["lines_expired"])
    assert (3, 2, 1, 7) == counts
    assert (100, 300) == (day["turnaround_p50_s"], day["turnaround_p95_s"])
    assert 1 == by_window["1h"]["batches_in_window"]


def test_stream_usage_reads_the_last_chunk_with_usage_even_when_split() -> None:
    scanner = StreamUsage()
    chunk = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'

    scanner.feed(b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n' + chunk[:30])
    scanner.feed(chunk[30:] + b"data: [DONE]\n\n")

    assert Usage(7, 0, 3, 0) == scanner.usage


def test_stream_usage_reads_a_responses_stream() -> None:
    scanner = StreamUsage()

    scanner.feed(
        b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
        b'{"input_tokens":4,"output_tokens":2}}}\n\n'
    )

    assert Usage(4, 0, 2, 0) == scanner.usage


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":5,"total_tokens":5}}', Usage(5, 0, 0, 0)),
        (
            b'{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens":1}}',
            Usage(5, 2, 1, 0),
        ),
        (b'{"choices":[]}', None),
    ],
)
def test_usage_in_body_reads_only_the_usage_object(body: bytes, expected: Usage | None) -> None:
    assert expected == usage_in_body(body)
