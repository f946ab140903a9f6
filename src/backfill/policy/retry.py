"""When to try a line again: exponential backoff with jitter, `Retry-After`, and a budget bounded by the window."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from backfill.domain.outcomes import Outcome, OutcomeKind


class Verdict(StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"


class Decision(msgspec.Struct, frozen=True):
    verdict: Verdict
    retry_at: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def backoff_s(self, attempts: int, rng: random.Random) -> float:
        """Exponential backoff with "equal jitter": between half and all of base·2^(attempts-1), capped."""
        ceiling: float = min(self.max_s, self.base_s * 2.0 ** max(0, attempts - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def decide(self, outcome: Outcome, attempts: int, now: float, deadline: float, rng: random.Random) -> Decision:
        """`attempts` counts this one. A retry is only scheduled if it can start before the deadline."""
        if outcome.kind is OutcomeKind.SUCCESS:
            return Decision(Verdict.SUCCEED)
        if not outcome.is_retryable:
            return Decision(Verdict.FAIL, reason="permanent error")
        if attempts >= self.max_attempts:
            return Decision(Verdict.FAIL, reason=f"gave up after {attempts} attempts")
        delay = self.backoff_s(attempts, rng)
        if outcome.retry_after_s is not None:
            delay = outcome.retry_after_s + rng.uniform(0, min(1.0, outcome.retry_after_s * 0.1))
        retry_at = now + delay
        if retry_at >= deadline:
            return Decision(Verdict.FAIL, reason="no time left in the completion window")
        return Decision(Verdict.RETRY, retry_at=retry_at)
