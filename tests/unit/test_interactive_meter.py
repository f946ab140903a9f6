"""InteractiveMeter, the least-loaded rule and the first-token scanner: pure, no I/O."""

from __future__ import annotations

import orjson
import pytest

from backfill.interactive import Candidate, FirstTokenScanner, InteractiveMeter, carries_content, least_loaded
from backfill.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_in_flight_counts_started_requests_until_they_end() -> None:
    meter = InteractiveMeter()
    meter.record_start("a")
    meter.record_start("a")
    meter.record_start("b")
    meter.record_end("a", 0.5, "2xx")

    assert (1, 1, 0) == (meter.in_flight("a"), meter.in_flight("b"), meter.in_flight("unknown"))
    assert 1.0 == sample(meter.metrics, "backfill_interactive_in_flight", backend="a")


def test_drain_returns_the_samples_since_the_previous_drain() -> None:
    meter = InteractiveMeter()
    for ttft in (0.1, 0.2):
        meter.record_first_token("a", ttft)
    meter.record_first_token("b", 0.3)

    assert [0.1, 0.2] == meter.drain_ttft("a")
    assert [] == meter.drain_ttft("a")
    meter.record_first_token("a", 0.4)
    assert [0.4] == meter.drain_ttft("a")
    assert [0.3] == meter.drain_ttft("b")
    assert [] == meter.drain_ttft("never")


def test_drain_keeps_only_the_newest_samples_when_nobody_drains() -> None:
    meter = InteractiveMeter(max_samples=3)
    for ttft in range(5):
        meter.record_first_token("a", float(ttft))

    assert [2.0, 3.0, 4.0] == meter.drain_ttft("a")


def test_prometheus_sees_ttft_latency_and_outcomes() -> None:
    metrics = Metrics()
    meter = InteractiveMeter(metrics)
    meter.record_start("a")
    meter.record_first_token("a", 0.05)
    meter.record_end("a", 0.7, "2xx")
    meter.record_start("a")
    meter.record_end("a", 0.01, "cancelled")

    assert 1.0 == sample(metrics, "backfill_interactive_ttft_seconds_count", backend="a")
    assert 0.05 == pytest.approx(sample(metrics, "backfill_interactive_ttft_seconds_sum", backend="a"))
    assert 2.0 == sample(metrics, "backfill_interactive_request_seconds_count", backend="a")
    assert 1.0 == sample(metrics, "backfill_interactive_requests_total", backend="a", outcome="2xx")
    assert 1.0 == sample(metrics, "backfill_interactive_requests_total", backend="a", outcome="cancelled")
    assert 0.0 == sample(metrics, "backfill_interactive_in_flight", backend="a")


def test_in_flight_never_goes_below_zero() -> None:
    meter = InteractiveMeter()
    meter.record_end("a", 0.1, "2xx")

    assert 0 == meter.in_flight("a")


def test_least_loaded_counts_batch_and_interactive_relative_to_capacity() -> None:
    candidates = [
        Candidate("big-but-busy", max_concurrency=64, batch_in_flight=60, interactive_in_flight=2),
        Candidate("small-and-idle", max_concurrency=8, batch_in_flight=1, interactive_in_flight=0),
    ]

    assert "small-and-idle" == least_loaded(candidates)


def test_least_loaded_breaks_ties_by_interactive_then_order() -> None:
    tied = [
        Candidate("first", max_concurrency=8, batch_in_flight=4, interactive_in_flight=0),
        Candidate("second", max_concurrency=8, batch_in_flight=2, interactive_in_flight=2),
        Candidate("third", max_concurrency=8, batch_in_flight=4, interactive_in_flight=0),
    ]

    assert "first" == least_loaded(tied)
    assert "first" == least_loaded([tied[1], tied[0]])


def test_least_loaded_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="empty"):
        least_loaded([])


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


ROLE_ONLY = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
CHAT_TEXT = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (ROLE_ONLY, False),
        (CHAT_TEXT, True),
        ({"choices": [{"index": 0, "delta": {"content": ""}}]}, False),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}, True),
        ({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}, True),
        ({"object": "text_completion", "choices": [{"index": 0, "text": "Once"}]}, True),
        ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, False),
        ({"type": "response.created", "response": {}}, False),
        ({"type": "response.output_text.delta", "delta": "Hi"}, True),
        ({"type": "response.output_text.delta", "delta": ""}, False),
        ({"error": {"message": "boom"}}, False),
    ],
)
def test_what_carries_content(payload: object, expected: bool) -> None:
    assert expected == carries_content(orjson.dumps(payload))


def test_done_and_garbage_carry_no_content() -> None:
    assert (False, False) == (carries_content(b"[DONE]"), carries_content(b"{not json"))


def test_scanner_finds_the_first_content_event_across_chunk_boundaries() -> None:
    stream = event(ROLE_ONLY) + event(CHAT_TEXT) + b"data: [DONE]\n\n"
    split = len(event(ROLE_ONLY)) + 10  # in the middle of the content event
    scanner = FirstTokenScanner()

    assert False is scanner.feed(stream[:split])
    assert True is scanner.feed(stream[split:])
    assert True is scanner.feed(b"anything after")


def test_scanner_reads_events_with_crlf_and_no_space_after_the_colon() -> None:
    scanner = FirstTokenScanner()

    assert True is scanner.feed(b"event: delta\r\ndata:" + orjson.dumps(CHAT_TEXT) + b"\r\n\r\n")


def test_scanner_says_nothing_for_a_stream_without_content() -> None:
    scanner = FirstTokenScanner()

    assert False is scanner.feed(event(ROLE_ONLY) + b"data: [DONE]\n\n")
    assert False is scanner.seen
