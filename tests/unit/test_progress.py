"""Progress arithmetic: rates over a sliding window, ETA, durations, and the exit code a batch ends with."""

from __future__ import annotations

import pytest

from backfill.domain.batches import BatchStatus
from backfill.progress import ExitCode, RateMeter, Snapshot, describe, format_duration, format_rate


def test_no_rate_until_samples_span_the_minimum() -> None:
    meter = RateMeter(window_s=20.0, min_span_s=1.0)
    meter.add(100.0, 0, 0)
    meter.add(100.5, 10, 50)

    assert (None, None, None) == (meter.lines_per_s(), meter.tokens_per_s(), meter.eta_s(10))


def test_rates_are_counted_from_the_first_sample() -> None:
    """After a resume the first look already shows lines done by the killed run: they are not this run's rate."""
    meter = RateMeter()
    meter.add(0.0, 500, 9000)
    meter.add(2.0, 520, 9400)

    assert 10.0 == meter.lines_per_s()
    assert 200.0 == meter.tokens_per_s()
    assert 8.0 == meter.eta_s(80)


def test_rate_follows_the_last_window_only() -> None:
    meter = RateMeter(window_s=10.0)
    for second in range(0, 31):  # 100 lines/s for 20 s, then 10 lines/s
        done = second * 100 if second <= 20 else 2000 + (second - 20) * 10
        meter.add(float(second), done, 0)

    assert 10.0 == meter.lines_per_s()


def test_eta_is_zero_with_nothing_left_and_unknown_without_progress() -> None:
    meter = RateMeter()
    meter.add(0.0, 5, 0)
    meter.add(5.0, 5, 0)

    assert 0.0 == meter.eta_s(0)
    assert meter.eta_s(3) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "--"), (0.4, "0s"), (42, "42s"), (65, "1m05s"), (3725, "1h02m"), (2 * 86400 + 3 * 3600, "2d03h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert text == format_duration(seconds)


def test_format_rate() -> None:
    assert ("--", "12.5", "1,234") == (format_rate(None), format_rate(12.46), format_rate(1234.4))


@pytest.mark.parametrize(
    ("snapshot", "code"),
    [
        (Snapshot(BatchStatus.COMPLETED, 10, 10, 0), ExitCode.OK),
        (Snapshot(BatchStatus.COMPLETED, 10, 9, 1), ExitCode.LINES_FAILED),
        (Snapshot(BatchStatus.EXPIRED, 10, 10, 0), ExitCode.LINES_FAILED),
        (Snapshot(BatchStatus.CANCELLED, 10, 3, 7), ExitCode.LINES_FAILED),
        (Snapshot(BatchStatus.FAILED), ExitCode.INVALID_INPUT),
        (Snapshot(BatchStatus.IN_PROGRESS, 10, 3, 0), ExitCode.ERROR),
    ],
)
def test_exit_code_of_a_batch(snapshot: Snapshot, code: ExitCode) -> None:
    assert code == snapshot.exit_code


def test_snapshot_from_the_api_batch_object() -> None:
    payload = {
        "status": "in_progress",
        "request_counts": {"total": 40, "completed": 12, "failed": 3},
        "usage": {"input_tokens": 900, "output_tokens": 321},
    }

    assert Snapshot(BatchStatus.IN_PROGRESS, 40, 12, 3, 321) == Snapshot.from_openai(payload)


def test_describe_shows_counts_rates_and_eta() -> None:
    meter = RateMeter()
    meter.add(0.0, 0, 0)
    meter.add(4.0, 20, 800)

    text = describe(Snapshot(BatchStatus.IN_PROGRESS, 100, 18, 2, 800), meter)

    assert "20/100 done · 2 failed · 5.0 req/s · 200 tok/s · ETA 16s" == text


def test_describe_has_no_eta_while_validating_and_zero_once_ended() -> None:
    meter = RateMeter()

    assert describe(Snapshot(BatchStatus.VALIDATING), meter).endswith("ETA --")
    assert describe(Snapshot(BatchStatus.COMPLETED, 5, 5, 0), meter).endswith("ETA 0s")
