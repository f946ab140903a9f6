"""Webhooks (docs/webhooks.md): event types, the event body in OpenAI's shape, endpoint secrets in Standard
Webhooks' `whsec_` form, and when a failed delivery is tried again. Pure: time and randomness are arguments."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from backfill.domain.batches import BatchApi, BatchStatus

SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32


class EventType(StrEnum):
    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_EXPIRED = "batch.expired"
    BATCH_CANCELLED = "batch.cancelled"
    # backfill's own: the scheduler promoted the batch because its deadline is in danger.
    BATCH_AT_RISK = "batch.at_risk"
    # A message batch (Anthropic's API) ended, whatever way: its `processing_status` became `ended`.
    MESSAGE_BATCH_ENDED = "message_batch.ended"
    MESSAGE_BATCH_AT_RISK = "message_batch.at_risk"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # tried for `retry_for_s` without success: listed at GET /v1/admin/webhooks/dead


# One-line batches behind a single call (docs/flex.md): their caller polls or waits, and they are no batch of its
# to announce. (OpenAI sends `response.*` events for background responses; not built.)
SILENT_APIS = frozenset({BatchApi.RESPONSES, BatchApi.FLEX})


def ended_event(api: BatchApi, status: BatchStatus) -> EventType:
    """The event of a batch reaching a terminal status."""
    if not status.is_terminal:
        raise ValueError(f"{status.value} is not a terminal status")
    if api is BatchApi.ANTHROPIC:
        return EventType.MESSAGE_BATCH_ENDED
    return EventType(f"batch.{status.value}")


def at_risk_event(api: BatchApi) -> EventType:
    return EventType.MESSAGE_BATCH_AT_RISK if api is BatchApi.ANTHROPIC else EventType.BATCH_AT_RISK


CONFIG_ENDPOINT_PREFIX = "whep_config_"


def config_endpoint_id(tenant: str, url: str) -> str:
    """The id of a `[[webhooks]]` endpoint: the same in every process and at every start, for the same entry."""
    return CONFIG_ENDPOINT_PREFIX + hashlib.sha256(f"{tenant}\n{url}".encode()).hexdigest()[:32]


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes, as Standard Webhooks (and OpenAI's SDK) read it."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


@dataclass(frozen=True)
class Event:
    """One thing that happened to a batch; `id` is also the `webhook-id` of every delivery of it, retries too."""

    id: str
    type: str
    created_at: int
    batch_id: str

    def to_dict(self) -> dict[str, Any]:
        """The body POSTed: OpenAI's event object."""
        return {
            "id": self.id,
            "object": "event",
            "created_at": self.created_at,
            "type": self.type,
            "data": {"id": self.batch_id},
        }


@dataclass(frozen=True)
class Delivery:
    """One event to one endpoint, leased for sending."""

    seq: int
    event: Event
    endpoint_id: str
    url: str
    secret: str
    attempts: int  # tries before this one


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff: `base_s`, doubling per failed try up to `max_s`, with up to `jitter` of it added at
    random; tried for `retry_for_s` after the event, then dead-lettered."""

    base_s: float = 5.0
    max_s: float = 3600.0
    retry_for_s: float = 86400.0
    jitter: float = 0.1

    def delay_s(self, failures: int, rand: float = 0.0) -> float:
        """The wait after the `failures`-th failed try (1 for the first); `rand` in [0, 1)."""
        raw = self.base_s * 2.0 ** min(max(failures - 1, 0), 62)
        return min(raw, self.max_s) * (1.0 + self.jitter * rand)

    def next_attempt_at(self, failures: int, created_at: float, now: float, rand: float = 0.0) -> float | None:
        """When to try again after a failure at `now`: at the horizon (`retry_for_s` after the event) at the
        latest, one last time; None once the horizon has passed (dead-letter)."""
        horizon = created_at + self.retry_for_s
        if now >= horizon:
            return None
        return min(now + self.delay_s(failures, rand), horizon)


@dataclass(frozen=True)
class WebhookEndpoint:
    """Where a tenant's events go. The secret is shown once, when the endpoint is created."""

    id: str
    tenant_id: str
    url: str
    secret: str
    created_at: int

    def to_dict(self, *, with_secret: bool = False) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "object": "webhook_endpoint",
            "id": self.id,
            "tenant_id": self.tenant_id,
            "url": self.url,
            "created_at": self.created_at,
        }
        if with_secret:
            shown["secret"] = self.secret
        return shown


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery as the admin API lists it (dead letters)."""

    seq: int
    event: Event
    tenant_id: str
    endpoint_id: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    finished_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "webhook_delivery",
            "id": self.seq,
            "event": self.event.to_dict(),
            "tenant_id": self.tenant_id,
            "endpoint_id": self.endpoint_id,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "finished_at": self.finished_at,
        }
