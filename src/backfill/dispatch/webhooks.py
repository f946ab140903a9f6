"""The webhook sender: its own task beside the dispatcher in every worker. It leases due deliveries from the
outbox, POSTs each event signed per Standard Webhooks, and records the outcome: delivered, retried later with
exponential backoff, or dead-lettered once the retry horizon (24 h) has passed. Leases keep two workers from
sending one delivery at once; a worker killed mid-send leaves a lease that lapses, and the delivery goes again
(at least once, with the same `webhook-id`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import orjson
import structlog
from standardwebhooks.webhooks import Webhook

from backfill import __version__
from backfill.domain.webhooks import Delivery, RetrySchedule
from backfill.metrics import Metrics
from backfill.ports import WebhookStore

log = structlog.get_logger(__name__)

_BATCH = 32  # deliveries leased at a time
_MAX_ERROR_CHARS = 500
_LEASE_MARGIN_S = 5.0


def signed_request(delivery: Delivery, now: float) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one try: `webhook-id` is the event's id, the same on every try."""
    body = orjson.dumps(delivery.event.to_dict())
    signature = Webhook(delivery.secret).sign(delivery.event.id, datetime.fromtimestamp(now, UTC), body)
    headers = {
        "content-type": "application/json",
        "user-agent": f"backfill/{__version__}",
        "webhook-id": delivery.event.id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signature,
    }
    return body, headers


class WebhookSender:
    def __init__(
        self,
        store: WebhookStore,
        client: httpx.AsyncClient,
        schedule: RetrySchedule,
        owner: str,
        clock: Callable[[], float],
        *,
        poll_interval_s: float,
        timeout_s: float,
        rand: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.client = client  # with its timeouts; tests inject a MockTransport
        self.schedule = schedule
        self.owner = owner
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.lease_ttl_s = timeout_s + _LEASE_MARGIN_S  # a try never outlasts its lease, so none is sent twice at once
        self.rand = rand
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set; a database hiccup is logged and tried again at the next poll."""
        while not stop.is_set():
            sent = 0
            try:
                sent = await self.send_due()
            except Exception:
                log.exception("webhooks.poll_failed")
            if sent < _BATCH:  # a full batch: more may be due at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval_s)

    async def send_due(self) -> int:
        """Lease the deliveries due now and try each once, concurrently; how many were tried."""
        due = await self.store.lease_deliveries(self.owner, self.clock(), _BATCH, self.lease_ttl_s)
        await asyncio.gather(*(self.send(delivery) for delivery in due))
        return len(due)

    async def send(self, delivery: Delivery) -> None:
        body, headers = signed_request(delivery, self.clock())
        error: str | None = None
        try:
            # A hard bound on the whole try (httpx's timeout is per read): the lease must outlive it.
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.post(delivery.url, content=body, headers=headers)
            if not response.is_success:  # 2xx only: a redirect is not followed, and is not a delivery
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        now = self.clock()
        retry_at = None
        if error is not None:
            retry_at = self.schedule.next_attempt_at(delivery.attempts + 1, delivery.event.created_at, now, self.rand())
        settled = await self.store.settle_delivery(
            delivery.seq, self.owner, now, delivered=error is None, retry_at=retry_at, error=error
        )
        outcome = "delivered" if error is None else "failed" if retry_at is not None else "dead"
        if self.metrics is not None:
            self.metrics.webhook_tries.labels(outcome).inc()
        log.info(
            "webhooks.tried",
            event_id=delivery.event.id,
            type=delivery.event.type,
            endpoint_id=delivery.endpoint_id,
            attempt=delivery.attempts + 1,
            error=error,
            outcome=outcome,
            settled=settled,
        )
