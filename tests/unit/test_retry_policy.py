"""RetryPolicy.decide: what to do after one attempt; time and randomness are arguments."""

from __future__ import annotations

import random

import pytest

from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.policy.retry import Decision, RetryPolicy, Verdict

NOW = 1_700_000_000.0
FAR = NOW + 86_400
POLICY = RetryPolicy(max_attempts=5, base_s=1.0, max_s=8.0)

SERVER_ERROR = Outcome(OutcomeKind.HTTP_ERROR, status_code=500, body=b"{}")


def rate_limited(retry_after_s: float | None) -> Outcome:
    return Outcome(OutcomeKind.HTTP_ERROR, status_code=429, body=b"{}", retry_after_s=retry_after_s)


def test_success_succeeds() -> None:
    outcome = Outcome(OutcomeKind.SUCCESS, status_code=200, body=b"{}")

    assert Decision(Verdict.SUCCEED) == POLICY.decide(outcome, 1, NOW, FAR, random.Random(1))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_client_errors_fail_at_once(status: int) -> None:
    outcome = Outcome(OutcomeKind.HTTP_ERROR, status_code=status, body=b"{}")

    decision = POLICY.decide(outcome, 1, NOW, FAR, random.Random(1))

    assert Verdict.FAIL == decision.verdict
    assert decision.retry_at is None


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(OutcomeKind.HTTP_ERROR, status_code=408, body=b"{}"),
        rate_limited(None),
        SERVER_ERROR,
        Outcome(OutcomeKind.HTTP_ERROR, status_code=503, body=b"{}"),
        Outcome(OutcomeKind.HTTP_ERROR, status_code=599, body=b"{}"),
        Outcome(OutcomeKind.TIMEOUT),
        Outcome(OutcomeKind.UNAVAILABLE),
    ],
    ids=["408", "429", "500", "503", "599", "timeout", "unavailable"],
)
def test_transient_failures_are_retried(outcome: Outcome) -> None:
    decision = POLICY.decide(outcome, 1, NOW, FAR, random.Random(1))

    assert Verdict.RETRY == decision.verdict
    assert decision.retry_at is not None
    assert NOW < decision.retry_at


@pytest.mark.parametrize(("attempts", "ceiling_s"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)])
def test_backoff_doubles_with_equal_jitter(attempts: int, ceiling_s: float) -> None:
    policy = RetryPolicy(max_attempts=10, base_s=1.0, max_s=60.0)
    rng = random.Random(7)

    delays = []
    for _ in range(200):
        decision = policy.decide(SERVER_ERROR, attempts, NOW, FAR, rng)
        assert decision.retry_at is not None
        delays.append(decision.retry_at - NOW)

    assert ceiling_s / 2 <= min(delays)
    assert max(delays) <= ceiling_s
    assert max(delays) - min(delays) > ceiling_s / 4  # jittered, not a constant


def test_backoff_is_capped_at_max_s() -> None:
    policy = RetryPolicy(max_attempts=100, base_s=1.0, max_s=8.0)
    rng = random.Random(3)

    delays = [policy.backoff_s(attempts, rng) for attempts in range(5, 60) for _ in range(5)]

    assert 4.0 <= min(delays)
    assert max(delays) <= 8.0


def test_same_seed_same_decision() -> None:
    first = POLICY.decide(SERVER_ERROR, 2, NOW, FAR, random.Random(42))
    second = POLICY.decide(SERVER_ERROR, 2, NOW, FAR, random.Random(42))

    assert first == second


def test_retry_after_is_honoured_over_the_backoff() -> None:
    rng = random.Random(5)

    for _ in range(100):
        decision = POLICY.decide(rate_limited(30.0), 1, NOW, FAR, rng)
        assert Verdict.RETRY == decision.verdict
        assert decision.retry_at is not None
        # never earlier than asked; at most 10% (and at most 1 s) of jitter on top
        assert NOW + 30.0 <= decision.retry_at <= NOW + 31.0


def test_short_retry_after_gets_proportional_jitter() -> None:
    rng = random.Random(5)

    for _ in range(100):
        decision = POLICY.decide(rate_limited(2.0), 1, NOW, FAR, rng)
        assert decision.retry_at is not None
        assert NOW + 2.0 <= decision.retry_at <= NOW + 2.2


def test_last_attempt_fails() -> None:
    assert Verdict.RETRY == POLICY.decide(SERVER_ERROR, 4, NOW, FAR, random.Random(1)).verdict

    decision = POLICY.decide(SERVER_ERROR, 5, NOW, FAR, random.Random(1))

    assert Verdict.FAIL == decision.verdict
    assert "5 attempts" in decision.reason


def test_one_attempt_budget_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)

    assert Verdict.FAIL == policy.decide(Outcome(OutcomeKind.TIMEOUT), 1, NOW, FAR, random.Random(1)).verdict


def test_retry_that_would_start_after_the_deadline_fails() -> None:
    decision = POLICY.decide(SERVER_ERROR, 1, NOW, NOW + 0.4, random.Random(1))  # backoff is 0.5..1 s

    assert Verdict.FAIL == decision.verdict
    assert decision.retry_at is None


def test_retry_after_past_the_deadline_fails() -> None:
    decision = POLICY.decide(rate_limited(120.0), 1, NOW, NOW + 60.0, random.Random(1))

    assert Verdict.FAIL == decision.verdict


def test_retries_are_never_scheduled_past_the_deadline() -> None:
    rng = random.Random(11)
    for attempts in range(1, 5):
        for deadline_in_s in (0.6, 1.0, 2.5, 5.0, 7.9, 30.0):
            for outcome in (SERVER_ERROR, rate_limited(0.7), rate_limited(6.0)):
                decision = POLICY.decide(outcome, attempts, NOW, NOW + deadline_in_s, rng)
                if decision.verdict is Verdict.RETRY:
                    assert decision.retry_at is not None
                    assert decision.retry_at < NOW + deadline_in_s
