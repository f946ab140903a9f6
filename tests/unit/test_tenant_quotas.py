"""The quota decisions at batch create and start: pure, time passed in."""

from __future__ import annotations

import pytest

from backfill.domain.tenants import Tenant, check_token_rate, create_refusal
from backfill.errors import TokenRateExceeded

NOW = 1_000


def tenant(**quotas: int) -> Tenant:
    return Tenant("tenant_x", "x", 1.0, 0, **quotas)


def test_no_quota_refuses_nothing() -> None:
    assert create_refusal(tenant(), 1000, [NOW] * 1000, NOW) is None


def test_batches_in_progress_refuse_at_the_limit() -> None:
    refusal = create_refusal(tenant(max_batches_in_progress=2), 2, [], NOW)

    assert refusal is not None
    assert (429, "rate_limit_error", "batch_limit_exceeded") == (refusal.status_code, refusal.error_type, refusal.code)
    assert create_refusal(tenant(max_batches_in_progress=2), 1, [], NOW) is None


def test_creates_per_minute_say_when_a_slot_frees() -> None:
    refusal = create_refusal(tenant(batch_creates_per_minute=2), 0, [NOW - 50, NOW - 10, NOW - 5], NOW)

    assert refusal is not None
    # Two of the three must leave the window: the second, made at NOW - 10, leaves it in 50 s.
    assert ("rate_limit_exceeded", 50) == (refusal.code, refusal.retry_after_s)
    assert create_refusal(tenant(batch_creates_per_minute=2), 0, [NOW - 5], NOW) is None


def test_batch_tokens_per_minute() -> None:
    check_token_rate(tenant(batch_tokens_per_minute=100), 60, 40)

    with pytest.raises(TokenRateExceeded):
        check_token_rate(tenant(batch_tokens_per_minute=100), 60, 41)
