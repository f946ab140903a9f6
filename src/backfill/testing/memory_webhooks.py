"""InMemoryStore's webhook endpoints and outbox (as SqlStore's `store.webhooks`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from backfill import ids
from backfill.domain.batches import Batch, BatchStatus
from backfill.domain.webhooks import (
    CONFIG_ENDPOINT_PREFIX,
    SILENT_APIS,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    Event,
    EventType,
    WebhookEndpoint,
    at_risk_event,
    ended_event,
)
from backfill.testing.memory_tables import MemoryTables

_AT_RISK = frozenset({EventType.BATCH_AT_RISK.value, EventType.MESSAGE_BATCH_AT_RISK.value})


@dataclass
class _Row:
    event: Event
    tenant_id: str
    endpoint_id: str
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    last_error: str | None = None
    finished_at: int | None = None


class MemoryWebhooks:
    tables: MemoryTables

    def __init__(self) -> None:
        super().__init__()
        self._endpoints: dict[str, WebhookEndpoint] = {}
        self._deliveries: dict[int, _Row] = {}
        self._delivery_seq = itertools.count(1)

    def queue_ended_event(self, batch: Batch, status: BatchStatus, now: int) -> None:
        """Called where the batch reaches its terminal status (InMemoryStore's finish_batch, fail_batch)."""
        self._fan_out(batch, ended_event(batch.api, status).value, now)

    def _fan_out(self, batch: Batch, event_type: str, now: int) -> int:
        if batch.api in SILENT_APIS:
            return 0
        event = Event(ids.new_id("evt_"), event_type, now, batch.id)
        endpoints = [e for e in self._endpoints.values() if e.tenant_id == batch.tenant_id]
        for endpoint in endpoints:
            self._deliveries[next(self._delivery_seq)] = _Row(event, batch.tenant_id, endpoint.id, next_attempt_at=now)
        return len(endpoints)

    async def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        self.tables.require_tenant(endpoint.tenant_id)
        self._endpoints[endpoint.id] = endpoint

    async def list_webhook_endpoints(self, tenant_id: str | None = None) -> list[WebhookEndpoint]:
        found = [e for e in self._endpoints.values() if tenant_id in (None, e.tenant_id)]
        return sorted(found, key=lambda e: (e.created_at, e.id))

    async def delete_webhook_endpoint(self, tenant_id: str, endpoint_id: str) -> bool:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None or endpoint.tenant_id != tenant_id:
            return False
        del self._endpoints[endpoint_id]
        for seq in [seq for seq, row in self._deliveries.items() if row.endpoint_id == endpoint_id]:
            del self._deliveries[seq]
        return True

    async def sync_config_endpoints(self, endpoints: Sequence[WebhookEndpoint]) -> None:
        wanted = {endpoint.id: endpoint for endpoint in endpoints}
        for endpoint_id in [e for e in self._endpoints if e.startswith(CONFIG_ENDPOINT_PREFIX) and e not in wanted]:
            await self.delete_webhook_endpoint(self._endpoints[endpoint_id].tenant_id, endpoint_id)
        for endpoint in endpoints:
            self.tables.require_tenant(endpoint.tenant_id)
            old = self._endpoints.get(endpoint.id)
            created_at = old.created_at if old is not None else endpoint.created_at
            self._endpoints[endpoint.id] = dataclasses.replace(endpoint, created_at=created_at)

    async def announce_at_risk(self, batch_ids: Sequence[str], now: int) -> int:
        queued = 0
        for batch_id in batch_ids:
            row = self.tables.batches.get(batch_id)
            announced = any(
                d.event.batch_id == batch_id and d.event.type in _AT_RISK for d in self._deliveries.values()
            )
            if row is not None and row.batch.status is BatchStatus.IN_PROGRESS and not announced:
                queued += self._fan_out(row.batch, at_risk_event(row.batch.api).value, now)
        return queued

    async def lease_deliveries(self, owner: str, now: float, limit: int, ttl_s: float) -> list[Delivery]:
        due = sorted(
            (
                (row.next_attempt_at, seq)
                for seq, row in self._deliveries.items()
                if row.state is DeliveryState.PENDING
                and row.next_attempt_at <= now
                and (row.lease_expires_at is None or row.lease_expires_at < now)
            )
        )[:limit]
        leased = []
        for _, seq in sorted(due, key=lambda pair: pair[1]):
            row = self._deliveries[seq]
            row.lease_owner, row.lease_expires_at = owner, now + ttl_s
            endpoint = self._endpoints[row.endpoint_id]
            leased.append(Delivery(seq, row.event, endpoint.id, endpoint.url, endpoint.secret, row.attempts))
        return leased

    async def settle_delivery(
        self, seq: int, owner: str, now: float, *, delivered: bool, retry_at: float | None, error: str | None
    ) -> bool:
        row = self._deliveries.get(seq)
        if row is None or row.lease_owner != owner or row.state is not DeliveryState.PENDING:
            return False
        row.attempts += 1
        row.lease_owner = row.lease_expires_at = None
        if delivered:
            row.state, row.finished_at, row.last_error = DeliveryState.DELIVERED, int(now), None
        elif retry_at is None:
            row.state, row.finished_at, row.last_error = DeliveryState.DEAD, int(now), error
        else:
            row.next_attempt_at, row.last_error = retry_at, error
        return True

    async def list_deliveries(
        self, state: DeliveryState, tenant_id: str | None = None, limit: int = 100
    ) -> list[DeliveryRecord]:
        found = [
            DeliveryRecord(
                seq, row.event, row.tenant_id, row.endpoint_id, row.state, row.attempts, row.last_error, row.finished_at
            )
            for seq, row in sorted(self._deliveries.items(), reverse=True)
            if row.state is state and tenant_id in (None, row.tenant_id)
        ]
        return found[:limit]

    async def redeliver(self, seq: int, now: float) -> bool:
        row = self._deliveries.get(seq)
        if row is None or row.state is not DeliveryState.DEAD:
            return False
        self._deliveries[seq] = dataclasses.replace(
            row, state=DeliveryState.PENDING, next_attempt_at=now, finished_at=None, attempts=0
        )
        return True
