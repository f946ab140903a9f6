"""Tenants as the admin API shows them: fair-share weight and quotas, and API keys without their secret."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from backfill.errors import QuotaExceeded, TokenRateExceeded

DEFAULT_TENANT = "default"  # open mode's tenant

# The quotas a tenant can have; None: no limit. The enqueued-token limit applies to each model on its own.
QUOTAS = (
    "enqueued_token_limit",  # estimated prompt tokens of unfinished lines, per model
    "max_batches_in_progress",  # batches not yet ended (validating .. finalizing, cancelling)
    "batch_creates_per_minute",  # batch creates in the last 60 s
    "batch_tokens_per_minute",  # estimated prompt tokens of batches started in the last 60 s
)


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    weight: float
    created_at: int
    enqueued_token_limit: int | None = None
    max_batches_in_progress: int | None = None
    batch_creates_per_minute: int | None = None
    batch_tokens_per_minute: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"object": "tenant", **{field.name: getattr(self, field.name) for field in fields(self)}}


@dataclass(frozen=True)
class TenantChange:
    """What `tenants update` sets: a field left None is unchanged; `cleared` quotas become unlimited."""

    weight: float | None = None
    quotas: dict[str, int] | None = None
    cleared: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeyInfo:
    """An API key as listed: never its secret, nor its hash."""

    id: str
    prefix: str
    tenant_id: str
    tenant: str
    admin: bool
    created_at: int
    last_used_at: int | None = None
    revoked_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"object": "api_key", **{field.name: getattr(self, field.name) for field in fields(self)}}


@dataclass(frozen=True)
class KeyMatch:
    """A live key found by its prefix: what authentication compares and remembers."""

    id: str
    salt: str
    key_hash: str
    tenant_id: str
    admin: bool


CREATES_WINDOW_S = 60


def create_refusal(tenant: Tenant, open_batches: int, recent_creates: list[int], now: int) -> QuotaExceeded | None:
    """Why a new batch of `tenant` is refused, if it is: `open_batches` not yet ended, `recent_creates` the
    creation times of its batches in the last minute."""
    limit = tenant.max_batches_in_progress
    if limit is not None and open_batches >= limit:
        return QuotaExceeded(
            f"Batch limit reached: {open_batches} batches of this tenant have not ended, the limit is {limit}. "
            "Retry once one has ended.",
            code="batch_limit_exceeded",
        )
    limit = tenant.batch_creates_per_minute
    if limit is not None and len(recent_creates) >= limit:
        oldest = sorted(recent_creates)[len(recent_creates) - limit]
        return QuotaExceeded(
            f"Rate limit reached for batch creates: limit {limit} per minute. Retry shortly.",
            code="rate_limit_exceeded",
            retry_after_s=max(1, oldest + CREATES_WINDOW_S - now),
        )
    return None


def check_token_rate(tenant: Tenant, started_tokens: int, wanted: int) -> None:
    """Raise TokenRateExceeded if a batch of `wanted` prompt tokens would take the tenant over its batch tokens per
    minute, with `started_tokens` in batches started in the last minute."""
    limit = tenant.batch_tokens_per_minute
    if limit is not None and started_tokens + wanted > limit:
        raise TokenRateExceeded(started=started_tokens, wanted=wanted, limit=limit)
